// convert.cl: the CUDA backend's dtype conversions, in OpenCL C compiled to PTX by clang
// (build.sh beside this file; the PTX is committed, so building tensorplace needs no CUDA
// toolkit and no clang, and the driver loads the PTX at run time without NVRTC).
//
// The scalar code is a line for line translation of `convert_bits` in src/convert.rs (the CPU
// reference, whose documentation says how each conversion rounds and which NaN it gives), as
// ../codec.wgsl is: every kernel equals the CPU reference bit for bit.
//
// Every kernel: (const uint *src, uint *dst, ulong units, ulong elements), grid-stride loop
// over `units`; a unit is PER elements = 4 / min(input size, output size), a whole number of
// words on both sides. Launch: any grid, blocks of 256 threads. src and dst are device
// pointers, 4-byte aligned; the output's last word is written whole (zeros past the last
// element), so dst must have room up to the next multiple of 4 bytes (the arena leaves it).

typedef unsigned int u32;
typedef unsigned long u64;
typedef int i32;

#define GID() ((u64)__nvvm_read_ptx_sreg_ctaid_x() * (u64)__nvvm_read_ptx_sreg_ntid_x() + (u64)__nvvm_read_ptx_sreg_tid_x())
#define STRIDE() ((u64)__nvvm_read_ptx_sreg_nctaid_x() * (u64)__nvvm_read_ptx_sreg_ntid_x())

// Formats.
#define E4M3 1u
#define E5M2 2u
#define F16 3u
#define BF16 4u
#define F32 5u
#define F64 6u
// Integers, signed or not: a 64-bit one narrowed to 32 bits keeps its low word.
#define INT64 7u
#define INT32 8u

#define ZERO 0u
#define INF 1u
#define FINITE 2u

typedef struct {
    u32 kind;
    i32 exp;
    u32 sig;
    int sticky;
} Value;

static Value value(u32 kind, i32 exp, u32 sig, int sticky) {
    Value v;
    v.kind = kind;
    v.exp = exp;
    v.sig = sig;
    v.sticky = sticky;
    return v;
}

static u32 exp_bits(u32 f) { return f == E4M3 ? 4u : (f == E5M2 || f == F16) ? 5u : 8u; }

static u32 man_bits(u32 f) {
    return f == E4M3 ? 3u : f == E5M2 ? 2u : f == F16 ? 10u : f == BF16 ? 7u : 23u;
}

static u32 nan_bits(u32 from, u32 to, u32 sgn, u32 lo, u32 hi) {
    if (to == F32) {
        if (from == F16) return (sgn << 31) | 0x7F800000u | ((lo & 0x3FFu) << 13);
        if (from == BF16) return (lo & 0xFFFFu) << 16;
        if (from == F64) return (sgn << 31) | 0x7FC00000u | ((hi & 0xFFFFFu) << 3) | (lo >> 29);
        return (sgn << 31) | 0x7FC00000u;
    }
    if (to == F16) {
        if (from == F32 || from == F64) {
            u32 payload = from == F32 ? (lo & 0x7FFFFFu) >> 13 : (hi & 0xFFFFFu) >> 10;
            return (sgn << 15) | 0x7C00u | (payload > 1u ? payload : 1u);
        }
        return (sgn << 15) | 0x7E00u;
    }
    if (to == BF16) return (sgn << 15) | 0x7FC0u;
    if (to == E4M3) return (sgn << 7) | 0x7Fu;
    return (sgn << 7) | 0x7Eu;
}

static Value decode(u32 from, u32 lo, u32 hi) {
    if (from == F64) {
        u32 e = (hi >> 20) & 0x7FFu;
        u32 m = hi & 0xFFFFFu;
        if (e == 0x7FFu) return value(INF, 0, 0u, 0);
        if (e == 0u) {
            if ((m | lo) == 0u) return value(ZERO, 0, 0u, 0);
            // Subnormal F64s lie far below every target's smallest subnormal.
            return value(FINITE, -1100, 0x80000000u, 1);
        }
        return value(FINITE, (i32)e - 1023, 0x80000000u | (m << 11) | (lo >> 21), (lo & 0x1FFFFFu) != 0u);
    }
    u32 eb = exp_bits(from);
    u32 mb = man_bits(from);
    i32 bias = (1 << (eb - 1u)) - 1;
    u32 e = (lo >> mb) & ((1u << eb) - 1u);
    u32 m = lo & ((1u << mb) - 1u);
    if (from != E4M3 && e == (1u << eb) - 1u) return value(INF, 0, 0u, 0);
    if (e == 0u) {
        if (m == 0u) return value(ZERO, 0, 0u, 0);
        u32 p = 31u - (u32)__builtin_clz(m);
        return value(FINITE, 1 - bias - (i32)(mb - p), m << (31u - p), 0);
    }
    return value(FINITE, (i32)e - bias, 0x80000000u | (m << (31u - mb)), 0);
}

static u32 encode(u32 to, u32 sgn, Value v) {
    u32 eb = exp_bits(to);
    u32 mb = man_bits(to);
    u32 s = sgn << (eb + mb);
    int fn_format = to == E4M3;
    i32 max_exp = fn_format ? 15 : (i32)((1u << eb) - 2u);
    u32 overflow = fn_format ? (s | 0x7Fu) : (s | (((1u << eb) - 1u) << mb));
    if (v.kind == ZERO) return s;
    if (v.kind == INF) return overflow;
    i32 bias = (1 << (eb - 1u)) - 1;
    i32 biased = v.exp + bias;
    if (biased > max_exp) return overflow;
    i32 drop = 31 - (i32)mb + (biased < 1 ? 1 - biased : 0);
    if (drop > 32) return s;
    u32 mant = 0u, rem = v.sig, halfway = 0x80000000u;
    if (drop < 32) {
        u32 d = (u32)drop;
        mant = v.sig >> d;
        rem = v.sig & ((1u << d) - 1u);
        halfway = 1u << (d - 1u);
    }
    int up = rem > halfway || (rem == halfway && (v.sticky || (mant & 1u) == 1u));
    u32 base = biased >= 1 ? ((u32)(biased - 1)) << mb : 0u;
    u32 r = base + mant + (up ? 1u : 0u);
    u32 limit = fn_format ? 0x7Fu : ((1u << eb) - 1u) << mb;
    if (r >= limit) return overflow;
    return s | r;
}

static u32 convert_bits(u32 from, u32 to, u32 lo, u32 hi) {
    if (from == INT64) return lo;
    u32 sgn;
    int is_nan;
    if (from == F64) {
        sgn = hi >> 31;
        is_nan = (hi & 0x7FF00000u) == 0x7FF00000u && ((hi & 0xFFFFFu) | lo) != 0u;
    } else {
        u32 e = exp_bits(from), m = man_bits(from);
        u32 emask = (1u << e) - 1u;
        u32 body = lo & ((1u << (e + m)) - 1u);
        is_nan = from == E4M3 ? body == 0x7Fu : ((body >> m) == emask && (body & ((1u << m) - 1u)) != 0u);
        sgn = (lo >> (e + m)) & 1u;
    }
    if (is_nan) return nan_bits(from, to, sgn, lo, hi);
    if (from == F64 && to == BF16) {
        // ml_dtypes rounds to F32 first.
        u32 f = encode(F32, sgn, decode(F64, lo, hi));
        return encode(to, sgn, decode(F32, f, 0u));
    }
    return encode(to, sgn, decode(from, lo, hi));
}

#define CONVERT(NAME, FROM, SRC_BYTES, TO, DST_BYTES)                                         \
    __kernel void NAME(__global const u32 *src, __global u32 *dst, u64 units, u64 elements) { \
        const u64 per = 4u / (SRC_BYTES < DST_BYTES ? SRC_BYTES : DST_BYTES);                \
        for (u64 i = GID(); i < units; i += STRIDE()) {                                       \
            u32 word = 0u;                                                                    \
            for (u64 k = 0; k < per; k++) {                                                   \
                u64 j = i * per + k;                                                          \
                u32 lo = 0u, hi = 0u, y = 0u;                                                 \
                if (j < elements) {                                                           \
                    if (SRC_BYTES == 8u) {                                                    \
                        lo = src[2 * j];                                                      \
                        hi = src[2 * j + 1];                                                  \
                    } else if (SRC_BYTES == 4u) {                                             \
                        lo = src[j];                                                          \
                    } else if (SRC_BYTES == 2u) {                                             \
                        lo = (src[j / 2] >> ((u32)(j % 2) * 16u)) & 0xFFFFu;                  \
                    } else {                                                                  \
                        lo = (src[j / 4] >> ((u32)(j % 4) * 8u)) & 0xFFu;                     \
                    }                                                                         \
                    y = convert_bits(FROM, TO, lo, hi);                                       \
                }                                                                             \
                u64 at = j * DST_BYTES;                                                       \
                word |= y << ((u32)(at % 4) * 8u);                                            \
                if ((at + DST_BYTES) % 4 == 0) {                                              \
                    if (at / 4 * 4 < elements * DST_BYTES) dst[at / 4] = word;                \
                    word = 0u;                                                                \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

// Every conversion of src/convert.rs (its table and its narrowings), named as
// Conversion::kernel_name names it.
CONVERT(f64_to_f32, F64, 8u, F32, 4u)
CONVERT(f64_to_f16, F64, 8u, F16, 2u)
CONVERT(f64_to_bf16, F64, 8u, BF16, 2u)
CONVERT(f32_to_f16, F32, 4u, F16, 2u)
CONVERT(f32_to_bf16, F32, 4u, BF16, 2u)
CONVERT(f32_to_f8_e4m3, F32, 4u, E4M3, 1u)
CONVERT(f32_to_f8_e5m2, F32, 4u, E5M2, 1u)
CONVERT(f16_to_f32, F16, 2u, F32, 4u)
CONVERT(f16_to_bf16, F16, 2u, BF16, 2u)
CONVERT(f16_to_f8_e4m3, F16, 2u, E4M3, 1u)
CONVERT(f16_to_f8_e5m2, F16, 2u, E5M2, 1u)
CONVERT(bf16_to_f32, BF16, 2u, F32, 4u)
CONVERT(bf16_to_f16, BF16, 2u, F16, 2u)
CONVERT(bf16_to_f8_e4m3, BF16, 2u, E4M3, 1u)
CONVERT(bf16_to_f8_e5m2, BF16, 2u, E5M2, 1u)
CONVERT(f8_e4m3_to_f32, E4M3, 1u, F32, 4u)
CONVERT(f8_e4m3_to_f16, E4M3, 1u, F16, 2u)
CONVERT(f8_e4m3_to_bf16, E4M3, 1u, BF16, 2u)
CONVERT(f8_e5m2_to_f32, E5M2, 1u, F32, 4u)
CONVERT(f8_e5m2_to_f16, E5M2, 1u, F16, 2u)
CONVERT(f8_e5m2_to_bf16, E5M2, 1u, BF16, 2u)
// The narrowings of 64-bit integers (Conversion::NARROWING; F64 to F32 is above).
CONVERT(i64_to_i32, INT64, 8u, INT32, 4u)
CONVERT(u64_to_u32, INT64, 8u, INT32, 4u)
