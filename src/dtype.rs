//! The 22 element types of the safetensors format, their sizes and the conversions between
//! the floating types that [`Loader::dtype`](crate::Loader::dtype) and `convert --dtype` offer.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

/// An element type of the safetensors format.
///
/// The declaration order is the reference writer's: [`save`](fn@crate::save) sorts tensors by
/// this order, descending, and then by name, exactly as `safetensors::serialize` does.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dtype {
    /// Boolean, one byte per element.
    BOOL,
    /// MXFP4 (E2M1), 4 bits per element.
    F4,
    /// MXFP6 E2M3, 6 bits per element.
    F6_E2M3,
    /// MXFP6 E3M2, 6 bits per element.
    F6_E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent and 2 mantissa bits, with infinities (OCP E5M2).
    F8_E5M2,
    /// 8-bit float, 4 exponent and 3 mantissa bits, no infinities (OCP E4M3FN).
    F8_E4M3,
    /// 8-bit power-of-two scale (OCP E8M0).
    F8_E8M0,
    /// 8-bit float E4M3, finite, unsigned zero (FNUZ).
    F8_E4M3FNUZ,
    /// 8-bit float E5M2, finite, unsigned zero (FNUZ).
    F8_E5M2FNUZ,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE 754 half precision.
    F16,
    /// Brain floating point (the upper half of an `f32`).
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE 754 single precision.
    F32,
    /// Complex number of two `f32` parts.
    C64,
    /// IEEE 754 double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl Dtype {
    /// Every dtype, in declaration order.
    pub const ALL: [Dtype; 22] = [
        Dtype::BOOL,
        Dtype::F4,
        Dtype::F6_E2M3,
        Dtype::F6_E3M2,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::F8_E4M3FNUZ,
        Dtype::F8_E5M2FNUZ,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// Size of one element in bits.
    pub const fn bits(self) -> usize {
        match self {
            Dtype::F4 => 4,
            Dtype::F6_E2M3 | Dtype::F6_E3M2 => 6,
            Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8_E5M2
            | Dtype::F8_E4M3
            | Dtype::F8_E8M0
            | Dtype::F8_E4M3FNUZ
            | Dtype::F8_E5M2FNUZ => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::C64 | Dtype::F64 | Dtype::I64 | Dtype::U64 => 64,
        }
    }

    /// The alignment, in bytes, that typed access to one element needs (1 for sub-byte types).
    pub const fn align(self) -> usize {
        match self.bits() {
            64 if matches!(self, Dtype::C64) => 4,
            b if b >= 8 => b / 8,
            _ => 1,
        }
    }

    /// The name used in safetensors headers, such as `"BF16"`.
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::F4 => "F4",
            Dtype::F6_E2M3 => "F6_E2M3",
            Dtype::F6_E3M2 => "F6_E3M2",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E8M0 => "F8_E8M0",
            Dtype::F8_E4M3FNUZ => "F8_E4M3FNUZ",
            Dtype::F8_E5M2FNUZ => "F8_E5M2FNUZ",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::C64 => "C64",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Whether this is a real floating-point type (the types `convert --dtype` casts).
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            Dtype::F4
                | Dtype::F6_E2M3
                | Dtype::F6_E3M2
                | Dtype::F8_E5M2
                | Dtype::F8_E4M3
                | Dtype::F8_E8M0
                | Dtype::F8_E4M3FNUZ
                | Dtype::F8_E5M2FNUZ
                | Dtype::F16
                | Dtype::BF16
                | Dtype::F32
                | Dtype::F64
        )
    }

    /// The number of bytes of `numel` elements, or `None` when it overflows or is not a whole
    /// number of bytes.
    pub fn bytes_for(self, numel: usize) -> Option<usize> {
        let bits = numel.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing a dtype name that the format does not define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}")]
pub struct UnknownDtype(pub String);

impl FromStr for Dtype {
    type Err = UnknownDtype;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| UnknownDtype(s.to_owned()))
    }
}

/// A conversion between two floating dtypes that every backend performs bit for bit alike.
///
/// The CPU functions here are the reference: the CUDA kernels and the WGSL shaders are tested
/// against them, NaN payloads, infinities and subnormals included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conversion {
    /// BF16 to F32 (exact).
    Bf16ToF32,
    /// F16 to F32 (exact).
    F16ToF32,
    /// F8_E4M3 to F32 (exact).
    F8E4m3ToF32,
    /// F8_E5M2 to F32 (exact).
    F8E5m2ToF32,
    /// F32 to F16, rounding to nearest even.
    F32ToF16,
    /// F32 to BF16, rounding to nearest even.
    F32ToBf16,
    /// BF16 to F16, rounding to nearest even (through F32, which is exact).
    Bf16ToF16,
    /// F16 to BF16, rounding to nearest even (through F32, which is exact).
    F16ToBf16,
}

impl Conversion {
    /// Every supported conversion.
    pub const ALL: [Conversion; 8] = [
        Conversion::Bf16ToF32,
        Conversion::F16ToF32,
        Conversion::F8E4m3ToF32,
        Conversion::F8E5m2ToF32,
        Conversion::F32ToF16,
        Conversion::F32ToBf16,
        Conversion::Bf16ToF16,
        Conversion::F16ToBf16,
    ];

    /// The conversion from `from` to `to`, if one is supported. `from == to` is no conversion.
    pub fn between(from: Dtype, to: Dtype) -> Option<Conversion> {
        Some(match (from, to) {
            (Dtype::BF16, Dtype::F32) => Conversion::Bf16ToF32,
            (Dtype::F16, Dtype::F32) => Conversion::F16ToF32,
            (Dtype::F8_E4M3, Dtype::F32) => Conversion::F8E4m3ToF32,
            (Dtype::F8_E5M2, Dtype::F32) => Conversion::F8E5m2ToF32,
            (Dtype::F32, Dtype::F16) => Conversion::F32ToF16,
            (Dtype::F32, Dtype::BF16) => Conversion::F32ToBf16,
            (Dtype::BF16, Dtype::F16) => Conversion::Bf16ToF16,
            (Dtype::F16, Dtype::BF16) => Conversion::F16ToBf16,
            _ => return None,
        })
    }

    /// The source dtype.
    pub const fn from(self) -> Dtype {
        match self {
            Conversion::Bf16ToF32 | Conversion::Bf16ToF16 => Dtype::BF16,
            Conversion::F16ToF32 | Conversion::F16ToBf16 => Dtype::F16,
            Conversion::F8E4m3ToF32 => Dtype::F8_E4M3,
            Conversion::F8E5m2ToF32 => Dtype::F8_E5M2,
            Conversion::F32ToF16 | Conversion::F32ToBf16 => Dtype::F32,
        }
    }

    /// The target dtype.
    pub const fn to(self) -> Dtype {
        match self {
            Conversion::Bf16ToF32
            | Conversion::F16ToF32
            | Conversion::F8E4m3ToF32
            | Conversion::F8E5m2ToF32 => Dtype::F32,
            Conversion::F32ToF16 | Conversion::Bf16ToF16 => Dtype::F16,
            Conversion::F32ToBf16 | Conversion::F16ToBf16 => Dtype::BF16,
        }
    }

    /// The name of the device kernel that performs it: `shaders/NAME.wgsl` and the entry
    /// point NAME of `shaders/cuda/convert.ptx`.
    pub const fn kernel_name(self) -> &'static str {
        match self {
            Conversion::Bf16ToF32 => "bf16_to_f32",
            Conversion::F16ToF32 => "f16_to_f32",
            Conversion::F8E4m3ToF32 => "f8_e4m3_to_f32",
            Conversion::F8E5m2ToF32 => "f8_e5m2_to_f32",
            Conversion::F32ToF16 => "f32_to_f16",
            Conversion::F32ToBf16 => "f32_to_bf16",
            Conversion::Bf16ToF16 => "bf16_to_f16",
            Conversion::F16ToBf16 => "f16_to_bf16",
        }
    }

    /// The size of the output for `input_bytes` bytes of input (a whole number of elements).
    pub fn output_len(self, input_bytes: usize) -> Option<usize> {
        let numel = input_bytes / (self.from().bits() / 8);
        self.to().bytes_for(numel)
    }

    /// Converts little-endian `input` into `output` on the CPU (the reference).
    ///
    /// `output.len()` must be [`output_len`](Self::output_len) of `input.len()`; extra bytes
    /// on either side are left alone.
    pub fn convert(self, input: &[u8], output: &mut [u8]) {
        fn map<const I: usize, const O: usize>(
            input: &[u8],
            output: &mut [u8],
            f: impl Fn([u8; I]) -> [u8; O],
        ) {
            for (i, o) in input.chunks_exact(I).zip(output.chunks_exact_mut(O)) {
                let mut a = [0u8; I];
                a.copy_from_slice(i);
                o.copy_from_slice(&f(a));
            }
        }
        match self {
            Conversion::Bf16ToF32 => map(input, output, |b: [u8; 2]| {
                bf16::from_le_bytes(b).to_f32().to_le_bytes()
            }),
            Conversion::F16ToF32 => map(input, output, |b: [u8; 2]| {
                f16::from_le_bytes(b).to_f32().to_le_bytes()
            }),
            Conversion::F8E4m3ToF32 => map(input, output, |b: [u8; 1]| {
                f8_e4m3_to_f32(b[0]).to_le_bytes()
            }),
            Conversion::F8E5m2ToF32 => map(input, output, |b: [u8; 1]| {
                f8_e5m2_to_f32(b[0]).to_le_bytes()
            }),
            Conversion::F32ToF16 => map(input, output, |b: [u8; 4]| {
                f16::from_f32(f32::from_le_bytes(b)).to_le_bytes()
            }),
            Conversion::F32ToBf16 => map(input, output, |b: [u8; 4]| {
                bf16::from_f32(f32::from_le_bytes(b)).to_le_bytes()
            }),
            Conversion::Bf16ToF16 => map(input, output, |b: [u8; 2]| {
                f16::from_f32(bf16::from_le_bytes(b).to_f32()).to_le_bytes()
            }),
            Conversion::F16ToBf16 => map(input, output, |b: [u8; 2]| {
                bf16::from_f32(f16::from_le_bytes(b).to_f32()).to_le_bytes()
            }),
        }
    }
}

impl fmt::Display for Conversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to {}", self.from(), self.to())
    }
}

/// Decodes an OCP F8 E4M3FN byte: bias 7, no infinities, `S.1111.111` is NaN.
pub fn f8_e4m3_to_f32(b: u8) -> f32 {
    let sign = u32::from(b >> 7) << 31;
    let exp = u32::from((b >> 3) & 0xF);
    let man = u32::from(b & 0x7);
    if exp == 0xF && man == 0x7 {
        return f32::from_bits(sign | 0x7FC0_0000);
    }
    if exp == 0 {
        // Subnormal: man * 2^-9, exact in f32.
        let magnitude = man as f32 / 512.0;
        return f32::from_bits(sign | magnitude.to_bits());
    }
    f32::from_bits(sign | ((exp + 120) << 23) | (man << 20))
}

/// Decodes an OCP F8 E5M2 byte: bias 15, with infinities and NaNs like IEEE half precision.
pub fn f8_e5m2_to_f32(b: u8) -> f32 {
    // E5M2 is the upper byte of an IEEE f16.
    f16::from_bits(u16::from(b) << 8).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sizes() {
        for d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>().unwrap(), d);
        }
        assert_eq!(Dtype::F4.bits(), 4);
        assert_eq!(Dtype::F6_E3M2.bits(), 6);
        assert_eq!(Dtype::C64.bits(), 64);
        assert_eq!(Dtype::F4.bytes_for(3), None);
        assert_eq!(Dtype::F4.bytes_for(4), Some(2));
        assert_eq!(Dtype::F6_E2M3.bytes_for(4), Some(3));
        assert_eq!(Dtype::U64.bytes_for(usize::MAX), None);
        assert!("f32".parse::<Dtype>().is_err());
    }

    #[test]
    fn f8_decoding() {
        assert_eq!(f8_e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(f8_e4m3_to_f32(0x81), -(2f32.powi(-9)));
        assert_eq!(f8_e4m3_to_f32(0x80).to_bits(), 0x8000_0000);
        assert_eq!(f8_e4m3_to_f32(0x38), 1.0);
        assert!(f8_e4m3_to_f32(0x7F).is_nan());
        assert!(f8_e4m3_to_f32(0xFF).is_sign_negative() && f8_e4m3_to_f32(0xFF).is_nan());
        assert_eq!(f8_e5m2_to_f32(0x3C), 1.0);
        assert_eq!(f8_e5m2_to_f32(0x7C), f32::INFINITY);
        assert_eq!(f8_e5m2_to_f32(0x01), 2f32.powi(-16));
        assert!(f8_e5m2_to_f32(0x7D).is_nan());
    }

    #[test]
    fn conversions_round_to_nearest_even() {
        // 1 + 2^-11 lies halfway between two f16 values: ties go to the even one (1.0).
        let x = 1.0f32 + 2f32.powi(-11);
        let mut out = [0u8; 2];
        Conversion::F32ToF16.convert(&x.to_le_bytes(), &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3C00);
        let y = 1.0f32 + 3.0 * 2f32.powi(-11);
        Conversion::F32ToF16.convert(&y.to_le_bytes(), &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3C02);
        Conversion::F32ToBf16.convert(&(1.0f32 + 2f32.powi(-8)).to_le_bytes(), &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3F80);
        for c in Conversion::ALL {
            assert_eq!(Conversion::between(c.from(), c.to()), Some(c));
        }
    }
}
