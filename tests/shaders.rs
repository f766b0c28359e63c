//! The WGSL kernels: validated by naga (no GPU needed), and bit for bit equal to the CPU
//! reference on a real wgpu device (Mesa's software Vulkan in CI), NaN payloads, infinities,
//! subnormals and odd lengths included.

use tensorplace::internals::Conversion;
#[cfg(feature = "wgpu")]
use tensorplace::internals::{KERNELS, WgpuBackend};

#[cfg(feature = "wgpu")]
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
            let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            bytes.extend(crate::common::bytes(4 * 200_001, 0x1234_5678_9ABC_DEF1));
            bytes
        }
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn every_kernel_is_bit_exact_on_the_device() {
    let backend = match WgpuBackend::open(None, None) {
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

/// The source of the CUDA kernels (`shaders/cuda/convert.cl`, compiled to the committed PTX)
/// compiled for this CPU with the host C compiler and run over the same inputs: the
/// algorithms equal the CPU reference bit for bit without a GPU. (The PTX itself runs in the
/// generic backend tests where a CUDA device is present.)
#[test]
fn cuda_kernel_source_is_bit_exact_on_the_host() {
    let root = crate::common::root();
    let source = root.join("shaders/cuda/convert.cl");
    let dir = tempfile::tempdir().unwrap();
    let harness = dir.path().join("harness.c");
    std::fs::write(
        &harness,
        format!(
            r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static unsigned __nvvm_read_ptx_sreg_ctaid_x(void) {{ return 0; }}
static unsigned __nvvm_read_ptx_sreg_ntid_x(void) {{ return 1; }}
static unsigned __nvvm_read_ptx_sreg_tid_x(void) {{ return 0; }}
static unsigned __nvvm_read_ptx_sreg_nctaid_x(void) {{ return 1; }}
#define __kernel
#define __global
#include "{}"
int main(int argc, char **argv) {{
    const char *names[] = {{"bf16_to_f32", "f16_to_f32", "f8_e4m3_to_f32", "f8_e5m2_to_f32",
                           "f32_to_f16", "f32_to_bf16", "bf16_to_f16", "f16_to_bf16"}};
    void (*kernels[])(const u32 *, u32 *, u64, u64) = {{bf16_to_f32, f16_to_f32, f8_e4m3_to_f32,
        f8_e5m2_to_f32, f32_to_f16, f32_to_bf16, bf16_to_f16, f16_to_bf16}};
    if (argc != 7) return 2;
    int k = -1;
    for (int i = 0; i < 8; i++) if (!strcmp(argv[1], names[i])) k = i;
    if (k < 0) return 3;
    u64 units = strtoull(argv[4], 0, 10), elements = strtoull(argv[5], 0, 10), out_len = strtoull(argv[6], 0, 10);
    FILE *f = fopen(argv[2], "rb");
    fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
    unsigned char *in = calloc(n + 16, 1), *out = calloc(out_len + 16, 1);
    if (fread(in, 1, n, f) != (size_t)n) return 4;
    fclose(f);
    kernels[k]((const u32 *)in, (u32 *)out, units, elements);
    f = fopen(argv[3], "wb");
    fwrite(out, 1, out_len, f);
    fclose(f);
    return 0;
}}
"#,
            source.display()
        ),
    )
    .unwrap();
    let exe = dir.path().join("harness");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    match std::process::Command::new(&cc)
        .args(["-O1", "-w", "-o"])
        .arg(&exe)
        .arg(&harness)
        .status()
    {
        Ok(s) if s.success() => {}
        other => {
            println!(
                "SKIPPED cuda_kernel_source_is_bit_exact_on_the_host: no working C compiler ({cc}: {other:?})"
            );
            return;
        }
    }
    for c in Conversion::ALL {
        let input = inputs(c);
        let mut want = vec![0u8; c.output_len(input.len()).unwrap()];
        c.convert(&input, &mut want);
        let elements = input.len() / (c.from().bits() / 8);
        let per_unit = if c.from().bits() == 8 { 4 } else { 2 };
        let name = format!("{c:?}");
        let kernel = c.kernel_name();
        let inp = dir.path().join(format!("{name}.in"));
        let outp = dir.path().join(format!("{name}.out"));
        std::fs::write(&inp, &input).unwrap();
        let status = std::process::Command::new(&exe)
            .arg(kernel)
            .arg(&inp)
            .arg(&outp)
            .arg(elements.div_ceil(per_unit).to_string())
            .arg(elements.to_string())
            .arg(want.len().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "{kernel}");
        let got = std::fs::read(&outp).unwrap();
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            panic!(
                "{kernel}: byte {i} is {:#04x}, the CPU gives {:#04x}",
                got[i], want[i]
            );
        }
    }
    // The committed PTX holds every kernel.
    let ptx = std::fs::read_to_string(root.join("shaders/cuda/convert.ptx")).unwrap();
    for c in Conversion::ALL {
        let k = c.kernel_name();
        assert!(
            ptx.contains(&format!(".entry {k}(")),
            "{k} missing from convert.ptx"
        );
    }
}
