//! Conversions between floating dtypes: the table [`Loader::dtype`](crate::Loader::dtype)
//! and `convert --dtype` offer, and the CPU reference every device kernel is tested against.
//!
//! Every conversion is bit for bit what the Python ecosystem computes: `ml_dtypes`' casts
//! (BF16 and the F8 types), and numpy's where `ml_dtypes` has none (F64 and F32 to F16, F16
//! to F32). That fixes the cases IEEE leaves open:
//!
//! - Rounding is to nearest, ties to even, subnormals exact, once: except F64 to BF16, which
//!   `ml_dtypes` rounds to F32 first (so a value just above a tie may round down).
//! - Overflow gives infinity, or NaN for F8_E4M3 (E4M3FN has no infinity); an infinity
//!   converted to F8_E4M3 is NaN too.
//! - NaNs keep their sign. numpy's conversions keep the payload's top bits (F16 to F32 keeps
//!   a signalling NaN signalling; F32 and F64 to F16 truncate it, turning a payload that
//!   truncates to zero into 1); F64 to F32 quiets it as x86 hardware does; BF16 to F32
//!   shifts it. Every other conversion gives the target's canonical quiet NaN (`0x7FC0`
//!   for BF16, `0x7E00` for F16, `0x7FC00000` for F32, `0x7F` for F8_E4M3, `0x7E` for
//!   F8_E5M2).
//!
//! The scalar code works on 32-bit words only (an F64 is two), as the WGSL kernel
//! (`shaders/convert.wgsl`) and the CUDA kernels (`shaders/cuda/convert.cl`) do, line for
//! line: each is a translation of [`convert_bits`].

use std::fmt;

use crate::dtype::Dtype;

/// The formats conversions read and write, numbered as the kernels number them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
enum Format {
    E4m3 = 1,
    E5m2 = 2,
    F16 = 3,
    Bf16 = 4,
    F32 = 5,
    F64 = 6,
    /// A 64-bit integer, signed or not: narrowed, it keeps its low 32 bits.
    Int64 = 7,
    /// A 32-bit integer, signed or not.
    Int32 = 8,
}

impl Format {
    const fn of(dtype: Dtype) -> Option<Format> {
        Some(match dtype {
            Dtype::F8_E4M3 => Format::E4m3,
            Dtype::F8_E5M2 => Format::E5m2,
            Dtype::F16 => Format::F16,
            Dtype::BF16 => Format::Bf16,
            Dtype::F32 => Format::F32,
            Dtype::F64 => Format::F64,
            Dtype::I64 | Dtype::U64 => Format::Int64,
            Dtype::I32 | Dtype::U32 => Format::Int32,
            _ => return None,
        })
    }

    /// Exponent and mantissa bits (F64 is handled apart; integers are never taken apart).
    const fn fields(self) -> (u32, u32) {
        match self {
            Format::E4m3 => (4, 3),
            Format::E5m2 => (5, 2),
            Format::F16 => (5, 10),
            Format::Bf16 => (8, 7),
            Format::F32 => (8, 23),
            Format::F64 => (11, 52),
            Format::Int64 | Format::Int32 => (0, 0),
        }
    }
}

/// A conversion between two floating dtypes, performed bit for bit alike on every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conversion {
    from: Dtype,
    to: Dtype,
}

/// The sources and targets of the conversion table.
const WIDE: [Dtype; 6] = [
    Dtype::F64,
    Dtype::F32,
    Dtype::F16,
    Dtype::BF16,
    Dtype::F8_E4M3,
    Dtype::F8_E5M2,
];

impl Conversion {
    /// Every supported conversion: any of F64, F32, F16, BF16, F8_E4M3, F8_E5M2 to any of
    /// F32, F16, BF16, and F32, F16, BF16 to F8_E4M3 and F8_E5M2.
    pub const ALL: [Conversion; 21] = {
        let mut all = [Conversion {
            from: Dtype::F32,
            to: Dtype::F16,
        }; 21];
        let mut n = 0;
        let mut i = 0;
        while i < WIDE.len() {
            let mut j = 0;
            while j < WIDE.len() {
                let (from, to) = (WIDE[i], WIDE[j]);
                if Conversion::supported(from, to) {
                    all[n] = Conversion { from, to };
                    n += 1;
                }
                j += 1;
            }
            i += 1;
        }
        all
    };

    const fn supported(from: Dtype, to: Dtype) -> bool {
        let wide_to = matches!(to, Dtype::F32 | Dtype::F16 | Dtype::BF16);
        let f8_to = matches!(to, Dtype::F8_E4M3 | Dtype::F8_E5M2);
        let narrow_from = matches!(from, Dtype::F32 | Dtype::F16 | Dtype::BF16);
        let float_from = matches!(
            from,
            Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F8_E4M3 | Dtype::F8_E5M2
        );
        let same = from as u8 == to as u8;
        float_from && !same && (wide_to || (f8_to && narrow_from))
    }

    /// The conversion from `from` to `to`, if the table has it (`from == to` is none).
    pub fn between(from: Dtype, to: Dtype) -> Option<Conversion> {
        Conversion::supported(from, to).then_some(Conversion { from, to })
    }

    /// The 64-bit types narrowed to 32 bits, as JAX holds them without `jax_enable_x64`
    /// (and as numpy's `astype` narrows): I64 and U64 keep their low 32 bits (two's
    /// complement: a value out of range wraps), F64 rounds to F32 as in the table.
    pub const NARROWING: [Conversion; 3] = [
        Conversion {
            from: Dtype::I64,
            to: Dtype::I32,
        },
        Conversion {
            from: Dtype::U64,
            to: Dtype::U32,
        },
        Conversion {
            from: Dtype::F64,
            to: Dtype::F32,
        },
    ];

    /// Every conversion a device kernel implements: the table, then the narrowings it lacks.
    pub fn with_kernels() -> impl Iterator<Item = Conversion> {
        let narrowing = Conversion::NARROWING
            .into_iter()
            .filter(|c| !Conversion::ALL.contains(c));
        Conversion::ALL.into_iter().chain(narrowing)
    }

    /// The narrowing of `from` to 32 bits ([`NARROWING`](Self::NARROWING)), if it is a 64-bit
    /// type that has one.
    pub fn narrowing(from: Dtype) -> Option<Conversion> {
        Conversion::NARROWING.into_iter().find(|c| c.from == from)
    }

    /// The source dtype.
    pub const fn from(self) -> Dtype {
        self.from
    }

    /// The target dtype.
    pub const fn to(self) -> Dtype {
        self.to
    }

    /// The formats' numbers, as the kernels take them: `(source, target)`.
    pub fn codes(self) -> (u32, u32) {
        (self.format_from() as u32, self.format_to() as u32)
    }

    fn format_from(self) -> Format {
        Format::of(self.from).unwrap_or(Format::F32)
    }

    fn format_to(self) -> Format {
        Format::of(self.to).unwrap_or(Format::F32)
    }

    /// Elements per unit of kernel work: a whole 32-bit word of input and of output
    /// (`4 / min(input size, output size)`).
    pub fn elements_per_unit(self) -> u64 {
        let smaller = self.from.bits().min(self.to.bits()) / 8;
        (4 / smaller) as u64
    }

    /// The name of its CUDA kernel in `shaders/cuda/convert.ptx`, such as `f16_to_bf16`.
    pub fn kernel_name(self) -> String {
        format!(
            "{}_to_{}",
            self.from.name().to_ascii_lowercase(),
            self.to.name().to_ascii_lowercase()
        )
    }

    /// The size of the output for `input_bytes` bytes of input (a whole number of elements).
    pub fn output_len(self, input_bytes: usize) -> Option<usize> {
        let numel = input_bytes / (self.from.bits() / 8);
        self.to.bytes_for(numel)
    }

    /// Converts one element: `x` holds the input's bits (an F64's all 64), the result the
    /// output's.
    pub fn convert_one(self, x: u64) -> u32 {
        convert_bits(
            self.format_from(),
            self.format_to(),
            x as u32,
            (x >> 32) as u32,
        )
    }

    /// Converts little-endian `input` into `output` on the CPU (the reference).
    ///
    /// `output.len()` must be [`output_len`](Self::output_len) of `input.len()`; extra bytes
    /// on either side are left alone. Inputs of 8 and 16 bits go through a table of every
    /// pattern's result, built once per conversion.
    pub fn convert(self, input: &[u8], output: &mut [u8]) {
        let in_size = self.from.bits() / 8;
        let out_size = self.to.bits() / 8;
        if self.format_from() == Format::Int64 {
            // The low 32 bits of each (little-endian: its first four bytes).
            for (i, o) in input.chunks_exact(8).zip(output.chunks_exact_mut(4)) {
                o.copy_from_slice(&i[..4]);
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.from == Dtype::F64 && self.to == Dtype::F32 {
            // The hardware's conversion is the table's (round to nearest even; a NaN quieted,
            // its payload's top bits kept: see the module's documentation), at memory speed.
            for (i, o) in input.chunks_exact(8).zip(output.chunks_exact_mut(4)) {
                let x = f64::from_le_bytes(i.try_into().unwrap_or([0; 8]));
                o.copy_from_slice(&(x as f32).to_bits().to_le_bytes());
            }
            return;
        }
        let elements = input
            .chunks_exact(in_size)
            .zip(output.chunks_exact_mut(out_size));
        if in_size <= 2 {
            let table = self.table();
            for (i, o) in elements {
                let x = if in_size == 1 {
                    usize::from(i[0])
                } else {
                    usize::from(u16::from_le_bytes([i[0], i[1]]))
                };
                o.copy_from_slice(&table[x].to_le_bytes()[..out_size]);
            }
            return;
        }
        for (i, o) in elements {
            let mut word = [0u8; 8];
            word[..in_size].copy_from_slice(i);
            let y = self.convert_one(u64::from_le_bytes(word));
            o.copy_from_slice(&y.to_le_bytes()[..out_size]);
        }
    }

    /// Every input pattern's result, for inputs of at most 16 bits.
    fn table(self) -> &'static [u32] {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static TABLES: OnceLock<Mutex<HashMap<Conversion, &'static [u32]>>> = OnceLock::new();
        let mut tables = TABLES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        tables.entry(self).or_insert_with(|| {
            let patterns = 1u64 << self.from.bits();
            let table: Vec<u32> = (0..patterns).map(|x| self.convert_one(x)).collect();
            Box::leak(table.into_boxed_slice())
        })
    }
}

impl fmt::Display for Conversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to {}", self.from, self.to)
    }
}

/// A value taken apart: its sign (0 or 1) and what it is.
#[derive(Debug, Clone, Copy)]
enum Value {
    Zero,
    Inf,
    /// `sig` (leading one at bit 31, `sticky` when nonzero bits lie below) times
    /// `2^(exp - 31)`.
    Finite {
        exp: i32,
        sig: u32,
        sticky: bool,
    },
}

/// Converts the bits `lo` (and `hi`, an F64's upper word) of `from` to `to`.
fn convert_bits(from: Format, to: Format, lo: u32, hi: u32) -> u32 {
    if from == Format::Int64 {
        return lo;
    }
    let (sign, nan) = match from {
        Format::F64 => (
            hi >> 31,
            (hi & 0x7FF0_0000) == 0x7FF0_0000 && ((hi & 0xF_FFFF) | lo) != 0,
        ),
        _ => {
            let (e, m) = from.fields();
            let emask = (1u32 << e) - 1;
            let body = lo & ((1u32 << (e + m)) - 1);
            let nan = if from == Format::E4m3 {
                body == 0x7F
            } else {
                (body >> m) == emask && (body & ((1u32 << m) - 1)) != 0
            };
            ((lo >> (e + m)) & 1, nan)
        }
    };
    if nan {
        return nan_bits(from, to, sign, lo, hi);
    }
    if from == Format::F64 && to == Format::Bf16 {
        // ml_dtypes rounds to F32 first.
        let f32 = encode(Format::F32, sign, decode(Format::F64, lo, hi));
        return encode(to, sign, decode(Format::F32, f32, 0));
    }
    encode(to, sign, decode(from, lo, hi))
}

/// The NaN `to` gives for a NaN of `from` (see the module's documentation).
fn nan_bits(from: Format, to: Format, sign: u32, lo: u32, hi: u32) -> u32 {
    match (to, from) {
        (Format::F32, Format::F16) => (sign << 31) | 0x7F80_0000 | ((lo & 0x3FF) << 13),
        (Format::F32, Format::Bf16) => (lo & 0xFFFF) << 16,
        (Format::F32, Format::F64) => {
            (sign << 31) | 0x7FC0_0000 | ((hi & 0xF_FFFF) << 3) | (lo >> 29)
        }
        (Format::F32, _) => (sign << 31) | 0x7FC0_0000,
        (Format::F16, Format::F32 | Format::F64) => {
            let payload = if from == Format::F32 {
                (lo & 0x7F_FFFF) >> 13
            } else {
                (hi & 0xF_FFFF) >> 10
            };
            (sign << 15) | 0x7C00 | payload.max(1)
        }
        (Format::F16, _) => (sign << 15) | 0x7E00,
        (Format::Bf16, _) => (sign << 15) | 0x7FC0,
        (Format::E4m3, _) => (sign << 7) | 0x7F,
        (Format::E5m2, _) => (sign << 7) | 0x7E,
        // No conversion gives these (integers are never taken apart).
        (Format::F64 | Format::Int64 | Format::Int32, _) => 0,
    }
}

/// Takes a non-NaN value of `from` apart.
fn decode(from: Format, lo: u32, hi: u32) -> Value {
    if from == Format::F64 {
        let e = (hi >> 20) & 0x7FF;
        let m = hi & 0xF_FFFF;
        return match e {
            0x7FF => Value::Inf,
            0 if (m | lo) == 0 => Value::Zero,
            // Subnormal F64s lie far below every target's smallest subnormal.
            0 => Value::Finite {
                exp: -1100,
                sig: 1 << 31,
                sticky: true,
            },
            _ => Value::Finite {
                exp: e as i32 - 1023,
                sig: (1 << 31) | (m << 11) | (lo >> 21),
                sticky: (lo & 0x1F_FFFF) != 0,
            },
        };
    }
    let (eb, mb) = from.fields();
    let bias = (1i32 << (eb - 1)) - 1;
    let e = (lo >> mb) & ((1 << eb) - 1);
    let m = lo & ((1 << mb) - 1);
    if from != Format::E4m3 && e == (1 << eb) - 1 {
        return Value::Inf;
    }
    if e == 0 {
        if m == 0 {
            return Value::Zero;
        }
        let p = 31 - m.leading_zeros();
        return Value::Finite {
            exp: 1 - bias - (mb - p) as i32,
            sig: m << (31 - p),
            sticky: false,
        };
    }
    Value::Finite {
        exp: e as i32 - bias,
        sig: (1 << 31) | (m << (31 - mb)),
        sticky: false,
    }
}

/// Puts a value together in `to`, rounding to nearest even.
fn encode(to: Format, sign: u32, value: Value) -> u32 {
    let (eb, mb) = to.fields();
    let s = sign << (eb + mb);
    let fn_format = to == Format::E4m3;
    // The largest biased exponent of a finite value, and what overflow gives.
    let (max_exp, overflow) = if fn_format {
        (15, s | 0x7F)
    } else {
        ((1i32 << eb) - 2, s | (((1 << eb) - 1) << mb))
    };
    let (exp, sig, sticky) = match value {
        Value::Zero => return s,
        Value::Inf => return overflow,
        Value::Finite { exp, sig, sticky } => (exp, sig, sticky),
    };
    let bias = (1i32 << (eb - 1)) - 1;
    let biased = exp + bias;
    if biased > max_exp {
        return overflow;
    }
    // Bits of `sig` below the kept mantissa: more for a subnormal result.
    let drop = 31 - mb as i32 + if biased < 1 { 1 - biased } else { 0 };
    if drop > 32 {
        return s;
    }
    let (mant, rem, half) = if drop == 32 {
        (0, sig, 1u32 << 31)
    } else {
        let drop = drop as u32;
        (sig >> drop, sig & ((1 << drop) - 1), 1u32 << (drop - 1))
    };
    let up = rem > half || (rem == half && (sticky || (mant & 1) == 1));
    // For a normal result `mant` holds the leading one, which adds 1 to `biased - 1`; a
    // carry out of the mantissa adds one more.
    let base = if biased >= 1 {
        ((biased - 1) as u32) << mb
    } else {
        0
    };
    let r = base + mant + u32::from(up);
    let limit = if fn_format {
        0x7F
    } else {
        ((1 << eb) - 1) << mb
    };
    if r >= limit {
        return overflow;
    }
    s | r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The narrowings give what Rust's `as` casts give (numpy's `astype`: integers wrap,
    /// F64 rounds to nearest even), the F64 fast path what the bit-level reference gives, on
    /// edge values and pseudo-random patterns (NaNs, infinities and subnormals among them).
    #[test]
    fn narrowings_equal_the_casts() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut values: Vec<u64> = vec![0, u64::MAX, i64::MIN as u64, 0x7FF0_0000_0000_0001];
        values.extend(
            [1.5f64, -0.0, f64::INFINITY, f64::MIN_POSITIVE / 3.0, 3.4e39].map(f64::to_bits),
        );
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x);
        }
        let input: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let run = |c: Conversion| {
            let mut out = vec![0u8; values.len() * 4];
            c.convert(&input, &mut out);
            out
        };
        let i32s: Vec<u8> = values
            .iter()
            .flat_map(|&v| (v as i64 as i32).to_le_bytes())
            .collect();
        let u32s: Vec<u8> = values
            .iter()
            .flat_map(|&v| (v as u32).to_le_bytes())
            .collect();
        let f32s: Vec<u8> = values
            .iter()
            .flat_map(|&v| c(Dtype::F64, Dtype::F32).convert_one(v).to_le_bytes())
            .collect();
        assert_eq!(run(Conversion::narrowing(Dtype::I64).unwrap()), i32s);
        assert_eq!(run(Conversion::narrowing(Dtype::U64).unwrap()), u32s);
        assert_eq!(run(Conversion::narrowing(Dtype::F64).unwrap()), f32s);
        assert_eq!(Conversion::narrowing(Dtype::F32), None);
        // Not offered as casts: `Loader::dtype` takes floating targets only.
        assert_eq!(Conversion::between(Dtype::I64, Dtype::I32), None);
        assert_eq!(Conversion::between(Dtype::I64, Dtype::F32), None);
    }

    fn c(from: Dtype, to: Dtype) -> Conversion {
        Conversion::between(from, to).unwrap()
    }

    #[test]
    fn the_table_has_21_conversions_and_no_identity() {
        let mut seen = std::collections::HashSet::new();
        for conv in Conversion::ALL {
            assert_ne!(conv.from(), conv.to());
            assert!(seen.insert(conv), "{conv} twice");
            assert_eq!(Conversion::between(conv.from(), conv.to()), Some(conv));
        }
        assert!(Conversion::between(Dtype::F64, Dtype::F8_E4M3).is_none());
        assert!(Conversion::between(Dtype::F8_E4M3, Dtype::F8_E5M2).is_none());
        assert!(Conversion::between(Dtype::I32, Dtype::F32).is_none());
        assert_eq!(c(Dtype::F16, Dtype::BF16).kernel_name(), "f16_to_bf16");
    }

    #[test]
    fn agrees_with_the_half_crate_on_numbers() {
        // Finite values and infinities: half's conversions are correctly rounded.
        for x in (0..=u16::MAX)
            .map(half::f16::from_bits)
            .filter(|x| !x.is_nan())
        {
            let f = x.to_f32();
            assert_eq!(
                c(Dtype::F16, Dtype::F32).convert_one(x.to_bits().into()),
                f.to_bits()
            );
            let b = half::bf16::from_f32(f).to_bits();
            assert_eq!(
                u32::from(b),
                c(Dtype::F16, Dtype::BF16).convert_one(x.to_bits().into())
            );
        }
        for bits in [
            0x3F80_0001u32,
            0x3380_0000,
            0x3380_0001,
            0x477F_F000,
            0x477F_EFFF,
            1,
        ] {
            let f = f32::from_bits(bits);
            let want = half::f16::from_f32(f).to_bits();
            assert_eq!(
                c(Dtype::F32, Dtype::F16).convert_one(bits.into()),
                u32::from(want)
            );
        }
        for d in [65520.0, 1e-8, -3.0e-5, 1e300, 0.1] {
            let want = half::f16::from_f64(d).to_bits();
            assert_eq!(
                c(Dtype::F64, Dtype::F16).convert_one(d.to_bits()),
                u32::from(want)
            );
            let want = (d as f32).to_bits();
            assert_eq!(c(Dtype::F64, Dtype::F32).convert_one(d.to_bits()), want);
        }
    }

    #[test]
    fn f8_rounding_overflow_and_nans() {
        let e4 = c(Dtype::F32, Dtype::F8_E4M3);
        let e5 = c(Dtype::F32, Dtype::F8_E5M2);
        let f = |x: f32| u64::from(x.to_bits());
        assert_eq!(e4.convert_one(f(448.0)), 0x7E);
        assert_eq!(e4.convert_one(f(464.0)), 0x7E); // a tie: to even
        assert_eq!(e4.convert_one(f(465.0)), 0x7F); // rounds past the largest: NaN
        assert_eq!(e4.convert_one(f(f32::NEG_INFINITY)), 0xFF);
        assert_eq!(e4.convert_one(f(2f32.powi(-10))), 0x00); // half the smallest: to even
        assert_eq!(e4.convert_one(f(1.5 * 2f32.powi(-10))), 0x01);
        assert_eq!(e5.convert_one(f(61440.0)), 0x7C);
        assert_eq!(e5.convert_one(f(61439.0)), 0x7B);
        assert_eq!(e5.convert_one(f(-0.0)), 0x80);
        assert_eq!(e5.convert_one(f(f32::NAN)), 0x7E);
        let back = c(Dtype::F8_E5M2, Dtype::F16);
        assert_eq!(back.convert_one(0x7D), 0x7E00);
        assert_eq!(back.convert_one(0x3C), 0x3C00);
        assert_eq!(
            c(Dtype::F8_E4M3, Dtype::F32).convert_one(0x01),
            2f32.powi(-9).to_bits()
        );
    }

    #[test]
    fn f64_to_f16_rounds_once() {
        // Just above a tie: rounding through F32 first would land on the tie and round down.
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(c(Dtype::F64, Dtype::F16).convert_one(x.to_bits()), 0x3C01);
    }

    #[test]
    fn f64_to_bf16_rounds_through_f32() {
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-30);
        assert_eq!(c(Dtype::F64, Dtype::BF16).convert_one(x.to_bits()), 0x3F80);
    }

    #[test]
    fn slices_convert_like_elements() {
        let conv = c(Dtype::BF16, Dtype::F8_E4M3);
        let input: Vec<u8> = (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect();
        let mut out = vec![0u8; conv.output_len(input.len()).unwrap()];
        conv.convert(&input, &mut out);
        for (x, &y) in (0..=u16::MAX).zip(&out) {
            assert_eq!(u32::from(y), conv.convert_one(x.into()), "{x:#x}");
        }
    }
}
