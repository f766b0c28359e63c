// convert.cl: the CUDA backend's dtype conversions, in OpenCL C compiled to PTX by clang
// (build.sh beside this file; the PTX is committed, so building tensorplace needs no CUDA
// toolkit and no clang, and the driver loads the PTX at run time without NVRTC).
//
// The scalar conversions are those of ../common.wgsl, step by step the algorithms of the
// `half` crate, so every kernel equals the CPU reference bit for bit (NaN payloads quieted
// the same way, rounding to nearest even, exact subnormals).
//
// Every kernel: (const uint *src, uint *dst, ulong units, ulong elements), grid-stride loop
// over `units`; a unit is what the matching .wgsl kernel's header says (one src word for the
// widening and 16-to-16 kernels, two src words for the narrowing ones). Launch: any grid,
// blocks of 256 threads. src and dst are device pointers, 4-byte aligned; dst may be written
// up to the next multiple of 4 bytes past the tensor's end (the arena leaves room).

typedef unsigned int u32;
typedef unsigned long u64;

#define GID() ((u64)__nvvm_read_ptx_sreg_ctaid_x() * (u64)__nvvm_read_ptx_sreg_ntid_x() + (u64)__nvvm_read_ptx_sreg_tid_x())
#define STRIDE() ((u64)__nvvm_read_ptx_sreg_nctaid_x() * (u64)__nvvm_read_ptx_sreg_ntid_x())

static u32 leading_bit(u32 x) { return 31u - (u32)__builtin_clz(x); }

static u32 f16_bits_to_f32_bits(u32 h) {
    u32 sign = (h & 0x8000u) << 16;
    u32 exp = h & 0x7C00u;
    u32 man = h & 0x03FFu;
    if ((h & 0x7FFFu) == 0u) return sign;
    if (exp == 0x7C00u) {
        if (man == 0u) return sign | 0x7F800000u;
        return sign | 0x7FC00000u | (man << 13);
    }
    if (exp == 0u) {
        u32 p = leading_bit(man);
        return sign | ((103u + p) << 23) | ((man << (23u - p)) & 0x7FFFFFu);
    }
    return sign | (((exp >> 10) + 112u) << 23) | (man << 13);
}

static u32 f32_bits_to_f16_bits(u32 x) {
    u32 sign = (x & 0x80000000u) >> 16;
    u32 exp = x & 0x7F800000u;
    u32 man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        u32 nan_bit = man != 0u ? 0x0200u : 0u;
        return sign | 0x7C00u | nan_bit | (man >> 13);
    }
    int half_exp = (int)(exp >> 23) - 112;
    if (half_exp >= 0x1F) return sign | 0x7C00u;
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return sign;
        u32 m = man | 0x00800000u;
        u32 shift = (u32)(14 - half_exp);
        u32 half_man = m >> shift;
        u32 round_bit = 1u << (shift - 1u);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) half_man += 1u;
        return sign | half_man;
    }
    u32 base = sign | ((u32)half_exp << 10) | (man >> 13);
    u32 round_bit = 0x1000u;
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) return base + 1u;
    return base;
}

static u32 bf16_bits_to_f32_bits(u32 b) {
    if ((b & 0x7FFFu) > 0x7F80u) return (b | 0x0040u) << 16;
    return b << 16;
}

static u32 f32_bits_to_bf16_bits(u32 x) {
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (x >> 16) | 0x0040u;
    u32 round_bit = 0x8000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) return ((x >> 16) + 1u) & 0xFFFFu;
    return x >> 16;
}

static u32 f8_e4m3_bits_to_f32_bits(u32 b) {
    u32 sign = (b & 0x80u) << 24;
    u32 exp = (b >> 3) & 0xFu;
    u32 man = b & 0x7u;
    if (exp == 0xFu && man == 0x7u) return sign | 0x7FC00000u;
    if (exp == 0u) {
        if (man == 0u) return sign;
        u32 p = leading_bit(man);
        return sign | ((118u + p) << 23) | ((man << (23u - p)) & 0x7FFFFFu);
    }
    return sign | ((exp + 120u) << 23) | (man << 20);
}

static u32 f8_e5m2_bits_to_f32_bits(u32 b) { return f16_bits_to_f32_bits(b << 8); }

#define WIDEN16(NAME, F)                                                              \
    __kernel void NAME(__global const u32 *src, __global u32 *dst, u64 units, u64 elements) { \
        for (u64 i = GID(); i < units; i += STRIDE()) {                               \
            u32 w = src[i];                                                           \
            dst[2 * i] = F(w & 0xFFFFu);                                              \
            if (2 * i + 1 < elements) dst[2 * i + 1] = F(w >> 16);                    \
        }                                                                             \
    }

#define WIDEN8(NAME, F)                                                               \
    __kernel void NAME(__global const u32 *src, __global u32 *dst, u64 units, u64 elements) { \
        for (u64 i = GID(); i < units; i += STRIDE()) {                               \
            u32 w = src[i];                                                           \
            for (u32 k = 0; k < 4u; k++)                                              \
                if (4 * i + k < elements) dst[4 * i + k] = F((w >> (8u * k)) & 0xFFu); \
        }                                                                             \
    }

#define NARROW32(NAME, F)                                                             \
    __kernel void NAME(__global const u32 *src, __global u32 *dst, u64 units, u64 elements) { \
        for (u64 i = GID(); i < units; i += STRIDE()) {                               \
            u32 lo = F(src[2 * i]);                                                   \
            u32 hi = 2 * i + 1 < elements ? F(src[2 * i + 1]) : 0u;                   \
            dst[i] = lo | (hi << 16);                                                 \
        }                                                                             \
    }

static u32 bf16_to_f16_bits(u32 b) { return f32_bits_to_f16_bits(bf16_bits_to_f32_bits(b)); }
static u32 f16_to_bf16_bits(u32 h) { return f32_bits_to_bf16_bits(f16_bits_to_f32_bits(h)); }

#define SAME16(NAME, F)                                                               \
    __kernel void NAME(__global const u32 *src, __global u32 *dst, u64 units, u64 elements) { \
        for (u64 i = GID(); i < units; i += STRIDE()) {                               \
            u32 w = src[i];                                                           \
            u32 hi = 2 * i + 1 < elements ? F(w >> 16) : 0u;                          \
            dst[i] = F(w & 0xFFFFu) | (hi << 16);                                     \
        }                                                                             \
    }

WIDEN16(bf16_to_f32, bf16_bits_to_f32_bits)
WIDEN16(f16_to_f32, f16_bits_to_f32_bits)
WIDEN8(f8_e4m3_to_f32, f8_e4m3_bits_to_f32_bits)
WIDEN8(f8_e5m2_to_f32, f8_e5m2_bits_to_f32_bits)
NARROW32(f32_to_f16, f32_bits_to_f16_bits)
NARROW32(f32_to_bf16, f32_bits_to_bf16_bits)
SAME16(bf16_to_f16, bf16_to_f16_bits)
SAME16(f16_to_bf16, f16_to_bf16_bits)
