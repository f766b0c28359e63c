// convert.wgsl: one conversion of the table in src/convert.rs. The host prepends common.wgsl,
// codec.wgsl and the constants SRC and DST (format numbers, see codec.wgsl), SRC_BYTES and
// DST_BYTES (element sizes) and PER_UNIT (elements per unit: 4 / min(SRC_BYTES, DST_BYTES)).
// Layout: elements packed little-endian in the words of src and dst.
// Unit: PER_UNIT elements, a whole number of words on both sides; the words of dst past the
// last element of `elements` are not written.
// Dispatch: ceil(units / 64) workgroups of 64 along x.

fn load(j: u32) -> u32 {
    var lo = 0u;
    var hi = 0u;
    if (SRC_BYTES == 8u) {
        lo = src[2u * j];
        hi = src[2u * j + 1u];
    } else if (SRC_BYTES == 4u) {
        lo = src[j];
    } else if (SRC_BYTES == 2u) {
        lo = (src[j / 2u] >> ((j % 2u) * 16u)) & 0xFFFFu;
    } else {
        lo = (src[j / 4u] >> ((j % 4u) * 8u)) & 0xFFu;
    }
    return convert_bits(SRC, DST, lo, hi);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= params.units) {
        return;
    }
    var word = 0u;
    for (var k = 0u; k < PER_UNIT; k += 1u) {
        let j = i * PER_UNIT + k;
        var y = 0u;
        if (j < params.elements) {
            y = load(j);
        }
        let at = j * DST_BYTES;
        word |= y << ((at % 4u) * 8u);
        if ((at + DST_BYTES) % 4u == 0u) {
            if (at / 4u * 4u < params.elements * DST_BYTES) {
                dst[at / 4u] = word;
            }
            word = 0u;
        }
    }
}
