// common.wgsl: the bindings every kernel of this folder shares, prepended to each.
//
//   @group(0) @binding(0) src:    array<u32>, read-only storage: the input, packed little-endian,
//                                 padded with zeros to a multiple of 4 bytes.
//   @group(0) @binding(1) dst:    array<u32>, read-write storage: the output, padded likewise.
//   @group(0) @binding(2) params: Params, uniform.
// Each dispatch covers one chunk of a tensor; the host binds the chunk's ranges of the two
// buffers (offsets multiples of 256 bytes, sizes within max_storage_buffer_binding_size).

struct Params {
    // Units of work in this dispatch; a kernel's header says what one unit is.
    units: u32,
    // Elements in this dispatch; the last unit may hold fewer than a whole unit's worth.
    elements: u32,
}

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;
