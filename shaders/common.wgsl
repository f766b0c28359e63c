// common.wgsl: prepended to every kernel in this folder (they are not valid on their own).
//
// Bindings, the same for every kernel:
//   @group(0) @binding(0) src:    array<u32>, read-only storage: the input, packed little-endian,
//                                 padded with zeros to a multiple of 4 bytes.
//   @group(0) @binding(1) dst:    array<u32>, read-write storage: the output, padded likewise.
//   @group(0) @binding(2) params: Params, uniform.
// Each dispatch covers one chunk of a tensor; the host binds the chunk's ranges of the two
// buffers (offsets multiples of 256 bytes, sizes within max_storage_buffer_binding_size).
//
// The scalar conversions below follow the `half` crate's algorithms step by step, so that
// every kernel equals the CPU reference bit for bit: NaNs are quieted the same way (payload
// kept, top mantissa bit set), rounding is to nearest even, subnormals are exact.

struct Params {
    // Units of work in this dispatch; a kernel's header says what one unit is.
    units: u32,
    // Elements in this dispatch; the last unit may hold fewer than a whole word's worth.
    elements: u32,
}

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;

// IEEE half (low 16 bits of h) to the bits of an f32: exact.
fn f16_bits_to_f32_bits(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let exp = h & 0x7C00u;
    let man = h & 0x03FFu;
    if ((h & 0x7FFFu) == 0u) {
        return sign;
    }
    if (exp == 0x7C00u) {
        if (man == 0u) {
            return sign | 0x7F800000u;
        }
        return sign | 0x7FC00000u | (man << 13u);
    }
    if (exp == 0u) {
        // Subnormal: normalize by the position p of the leading one (0..9).
        let p = firstLeadingBit(man);
        return sign | ((103u + p) << 23u) | ((man << (23u - p)) & 0x7FFFFFu);
    }
    return sign | (((exp >> 10u) + 112u) << 23u) | (man << 13u);
}

// The bits of an f32 to IEEE half bits, rounding to nearest even.
fn f32_bits_to_f16_bits(x: u32) -> u32 {
    let sign = (x & 0x80000000u) >> 16u;
    let exp = x & 0x7F800000u;
    let man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        var nan_bit = 0u;
        if (man != 0u) {
            nan_bit = 0x0200u;
        }
        return sign | 0x7C00u | nan_bit | (man >> 13u);
    }
    let half_exp = i32(exp >> 23u) - 112;
    if (half_exp >= 0x1F) {
        return sign | 0x7C00u;
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return sign;
        }
        let m = man | 0x00800000u;
        let shift = u32(14 - half_exp);
        var half_man = m >> shift;
        let round_bit = 1u << (shift - 1u);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) {
            half_man += 1u;
        }
        return sign | half_man;
    }
    let base = sign | (u32(half_exp) << 10u) | (man >> 13u);
    let round_bit = 0x1000u;
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) {
        return base + 1u;
    }
    return base;
}

// BF16 (low 16 bits of b) to the bits of an f32: exact, NaNs quieted.
fn bf16_bits_to_f32_bits(b: u32) -> u32 {
    if ((b & 0x7FFFu) > 0x7F80u) {
        return (b | 0x0040u) << 16u;
    }
    return b << 16u;
}

// The bits of an f32 to BF16 bits, rounding to nearest even.
fn f32_bits_to_bf16_bits(x: u32) -> u32 {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
        return (x >> 16u) | 0x0040u;
    }
    let round_bit = 0x8000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) {
        return ((x >> 16u) + 1u) & 0xFFFFu;
    }
    return x >> 16u;
}

// OCP F8 E4M3FN (low 8 bits of b) to the bits of an f32: exact; S.1111.111 is NaN.
fn f8_e4m3_bits_to_f32_bits(b: u32) -> u32 {
    let sign = (b & 0x80u) << 24u;
    let exp = (b >> 3u) & 0xFu;
    let man = b & 0x7u;
    if (exp == 0xFu && man == 0x7u) {
        return sign | 0x7FC00000u;
    }
    if (exp == 0u) {
        if (man == 0u) {
            return sign;
        }
        let p = firstLeadingBit(man);
        return sign | ((118u + p) << 23u) | ((man << (23u - p)) & 0x7FFFFFu);
    }
    return sign | ((exp + 120u) << 23u) | (man << 20u);
}
