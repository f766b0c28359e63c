//! The WGSL kernels: validated by naga (no GPU needed), and bit for bit equal to the CPU
//! reference on a real wgpu device (Mesa's software Vulkan in CI), NaN payloads, infinities,
//! subnormals and odd lengths included.

#![cfg(feature = "wgpu")]

use tensorplace::Conversion;
use tensorplace::device::wgpu::{KERNELS, WgpuBackend};

#[test]
fn every_kernel_validates_with_naga() {
    assert!(KERNELS.len() >= 8);
    for kernel in &KERNELS {
        let source = kernel.module_source();
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{}: {}", kernel.file, e.emit_to_string(&source)));
        let caps = if kernel.needs_f16 {
            naga::valid::Capabilities::SHADER_FLOAT16
        } else {
            naga::valid::Capabilities::empty()
        };
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", kernel.file, e.emit_to_string(&source)));
        assert!(
            module.entry_points.iter().any(|e| e.name == "main"),
            "{} has no main",
            kernel.file
        );
    }
    for c in Conversion::ALL {
        assert!(
            KERNELS.iter().any(|k| k.conversion == c && !k.needs_f16),
            "{c} has no kernel"
        );
    }
}

/// Inputs that cover every bit pattern of 8- and 16-bit types, and the interesting ones of
/// f32 (specials, rounding ties on both sides, subnormal ranges) plus pseudo-random words.
fn inputs(c: Conversion) -> Vec<u8> {
    match c.from().bits() {
        8 => {
            // 255 elements: not a multiple of 4, so the last word is partial.
            (0..=255u8).chain(0..=254u8).collect()
        }
        16 => {
            // Every pattern, then one more: an odd count.
            let mut v: Vec<u8> = (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect();
            v.extend_from_slice(&0x7E01u16.to_le_bytes());
            v
        }
        _ => {
            let mut words: Vec<u32> = vec![
                0,
                0x8000_0000,
                0x7F80_0000,
                0xFF80_0000,
                0x7FC0_0000,
                0x7F80_0001,
                0xFFFF_FFFF,
                0x7F7F_FFFF,
                0x0000_0001,
                0x0080_0000,
                0x3F80_0000,
            ];
            for e in 0..256u32 {
                for m in [
                    0, 1, 0xFFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x18000,
                    0x7F_FFFF,
                ] {
                    words.push((e << 23) | m);
                    words.push(0x8000_0000 | (e << 23) | m);
                }
            }
            let mut s = 0x1234_5678_9ABC_DEF1u64;
            for _ in 0..200_001 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                words.push(s as u32);
            }
            words.iter().flat_map(|w| w.to_le_bytes()).collect()
        }
    }
}

#[test]
fn every_kernel_is_bit_exact_on_the_device() {
    let backend = match WgpuBackend::open(None) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIPPED every_kernel_is_bit_exact_on_the_device: no wgpu adapter: {e}");
            return;
        }
    };
    println!("wgpu adapter: {:?}", backend.info().name);
    for kernel in &KERNELS {
        if kernel.needs_f16 && !backend.has_f16() {
            println!("SKIPPED {}: the adapter lacks SHADER_F16", kernel.file);
            continue;
        }
        let c = kernel.conversion;
        let input = inputs(c);
        let mut want = vec![0u8; c.output_len(input.len()).unwrap()];
        c.convert(&input, &mut want);
        let got = backend.run_kernel(kernel, &input).unwrap();
        assert_eq!(got.len(), want.len(), "{}", kernel.file);
        if kernel.needs_f16 {
            // The backend uses the native kernel only where its self-check found it exact:
            // that decision must match what this exhaustive comparison finds.
            let exact = got[..65536 * 4] == want[..65536 * 4];
            assert_eq!(backend.native_f16_verified(), exact, "{}", kernel.file);
            if !exact {
                println!(
                    "{}: inexact on this driver; the backend uses f16_to_f32.wgsl",
                    kernel.file
                );
                let fallback = backend.convert(c, &input).unwrap();
                assert!(fallback == want, "the F16 -> F32 fallback is inexact");
                continue;
            }
        }
        let out = c.to().bits() / 8;
        let inb = c.from().bits() / 8;
        if let Some(i) =
            (0..want.len() / out).find(|&i| got[i * out..][..out] != want[i * out..][..out])
        {
            panic!(
                "{}: element {i} (input {:02x?}) gave {:02x?}, the CPU gives {:02x?}",
                kernel.file,
                &input[i * inb..][..inb],
                &got[i * out..][..out],
                &want[i * out..][..out]
            );
        }
    }
}
