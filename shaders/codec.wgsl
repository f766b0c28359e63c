// codec.wgsl: the scalar conversions, prepended fout every kernel after common.wgsl. A line for
// line translation of `convert_bits` in src/convert.rs (the CPU reference; its module
// documentation says which NaN each conversion gives and how it rounds), on 32-bit words:
// an F64 is two, `lo` and `hi`.
//
// Formats: 1 F8_E4M3 (E4M3FN), 2 F8_E5M2, 3 F16, 4 BF16, 5 F32, 6 F64.

const E4M3: u32 = 1u;
const E5M2: u32 = 2u;
const F16: u32 = 3u;
const BF16: u32 = 4u;
const F32: u32 = 5u;
const F64: u32 = 6u;
// Integers, signed or not: a 64-bit one narrowed to 32 bits keeps its low word.
const INT64: u32 = 7u;
const INT32: u32 = 8u;

const ZERO: u32 = 0u;
const INF: u32 = 1u;
const FINITE: u32 = 2u;

// A value taken apart: `sig` (leading one at bit 31, `sticky` when nonzero bits lie below)
// times 2^(exp - 31), for kind FINITE.
struct Value {
    kind: u32,
    exp: i32,
    sig: u32,
    sticky: bool,
}

fn exp_bits(f: u32) -> u32 {
    switch f {
        case 1u: { return 4u; }
        case 2u, 3u: { return 5u; }
        default: { return 8u; }
    }
}

fn man_bits(f: u32) -> u32 {
    switch f {
        case 1u: { return 3u; }
        case 2u: { return 2u; }
        case 3u: { return 10u; }
        case 4u: { return 7u; }
        default: { return 23u; }
    }
}

fn nan_bits(fin: u32, fout: u32, sgn: u32, lo: u32, hi: u32) -> u32 {
    if (fout == F32) {
        if (fin == F16) {
            return (sgn << 31u) | 0x7F800000u | ((lo & 0x3FFu) << 13u);
        }
        if (fin == BF16) {
            return (lo & 0xFFFFu) << 16u;
        }
        if (fin == F64) {
            return (sgn << 31u) | 0x7FC00000u | ((hi & 0xFFFFFu) << 3u) | (lo >> 29u);
        }
        return (sgn << 31u) | 0x7FC00000u;
    }
    if (fout == F16) {
        if (fin == F32 || fin == F64) {
            var payload = (hi & 0xFFFFFu) >> 10u;
            if (fin == F32) {
                payload = (lo & 0x7FFFFFu) >> 13u;
            }
            return (sgn << 15u) | 0x7C00u | max(payload, 1u);
        }
        return (sgn << 15u) | 0x7E00u;
    }
    if (fout == BF16) {
        return (sgn << 15u) | 0x7FC0u;
    }
    if (fout == E4M3) {
        return (sgn << 7u) | 0x7Fu;
    }
    return (sgn << 7u) | 0x7Eu;
}

fn decode(fin: u32, lo: u32, hi: u32) -> Value {
    if (fin == F64) {
        let e = (hi >> 20u) & 0x7FFu;
        let m = hi & 0xFFFFFu;
        if (e == 0x7FFu) {
            return Value(INF, 0, 0u, false);
        }
        if (e == 0u) {
            if ((m | lo) == 0u) {
                return Value(ZERO, 0, 0u, false);
            }
            // Subnormal F64s lie far below every target's smallest subnormal.
            return Value(FINITE, -1100, 0x80000000u, true);
        }
        return Value(FINITE, i32(e) - 1023, 0x80000000u | (m << 11u) | (lo >> 21u), (lo & 0x1FFFFFu) != 0u);
    }
    let eb = exp_bits(fin);
    let mb = man_bits(fin);
    let bias = (1i << (eb - 1u)) - 1i;
    let e = (lo >> mb) & ((1u << eb) - 1u);
    let m = lo & ((1u << mb) - 1u);
    if (fin != E4M3 && e == (1u << eb) - 1u) {
        return Value(INF, 0, 0u, false);
    }
    if (e == 0u) {
        if (m == 0u) {
            return Value(ZERO, 0, 0u, false);
        }
        let p = firstLeadingBit(m);
        return Value(FINITE, 1i - bias - i32(mb - p), m << (31u - p), false);
    }
    return Value(FINITE, i32(e) - bias, 0x80000000u | (m << (31u - mb)), false);
}

fn encode(fout: u32, sgn: u32, v: Value) -> u32 {
    let eb = exp_bits(fout);
    let mb = man_bits(fout);
    let s = sgn << (eb + mb);
    let fn_format = fout == E4M3;
    var max_exp = i32((1u << eb) - 2u);
    var overflow = s | (((1u << eb) - 1u) << mb);
    if (fn_format) {
        max_exp = 15;
        overflow = s | 0x7Fu;
    }
    if (v.kind == ZERO) {
        return s;
    }
    if (v.kind == INF) {
        return overflow;
    }
    let bias = (1i << (eb - 1u)) - 1i;
    let biased = v.exp + bias;
    if (biased > max_exp) {
        return overflow;
    }
    var drop = 31i - i32(mb);
    if (biased < 1i) {
        drop += 1i - biased;
    }
    if (drop > 32i) {
        return s;
    }
    var mant = 0u;
    var rem = v.sig;
    var halfway = 0x80000000u;
    if (drop < 32i) {
        let d = u32(drop);
        mant = v.sig >> d;
        rem = v.sig & ((1u << d) - 1u);
        halfway = 1u << (d - 1u);
    }
    let up = rem > halfway || (rem == halfway && (v.sticky || (mant & 1u) == 1u));
    var base = 0u;
    if (biased >= 1i) {
        base = u32(biased - 1i) << mb;
    }
    var r = base + mant;
    if (up) {
        r += 1u;
    }
    var limit = ((1u << eb) - 1u) << mb;
    if (fn_format) {
        limit = 0x7Fu;
    }
    if (r >= limit) {
        return overflow;
    }
    return s | r;
}

fn convert_bits(fin: u32, fout: u32, lo: u32, hi: u32) -> u32 {
    if (fin == INT64) {
        return lo;
    }
    var sgn = 0u;
    var is_nan = false;
    if (fin == F64) {
        sgn = hi >> 31u;
        is_nan = (hi & 0x7FF00000u) == 0x7FF00000u && ((hi & 0xFFFFFu) | lo) != 0u;
    } else {
        let e = exp_bits(fin);
        let m = man_bits(fin);
        let emask = (1u << e) - 1u;
        let body = lo & ((1u << (e + m)) - 1u);
        if (fin == E4M3) {
            is_nan = body == 0x7Fu;
        } else {
            is_nan = (body >> m) == emask && (body & ((1u << m) - 1u)) != 0u;
        }
        sgn = (lo >> (e + m)) & 1u;
    }
    if (is_nan) {
        return nan_bits(fin, fout, sgn, lo, hi);
    }
    if (fin == F64 && fout == BF16) {
        // ml_dtypes rounds fout F32 first.
        let f = encode(F32, sgn, decode(F64, lo, hi));
        return encode(fout, sgn, decode(F32, f, 0u));
    }
    return encode(fout, sgn, decode(fin, lo, hi));
}
