//! The conversion table against the Python ecosystem's casts (`tests/fixtures/casts.safetensors`,
//! written by `make_casts.py` with `ml_dtypes` and numpy): the CPU reference, the WGSL kernels
//! on a real wgpu device (Mesa's software Vulkan in CI), the CUDA kernels' source compiled for
//! this CPU, and the PTX on a CUDA device where present. Every 8- and 16-bit pattern, and the
//! rounding, overflow and NaN cases of F32 and F64.

use std::collections::HashMap;

use tensorplace::Dtype;
use tensorplace::internals::Conversion;
#[cfg(feature = "wgpu")]
use tensorplace::internals::{Kernel, WgpuBackend};

/// The fixture's tensors: raw bits, by name.
fn table() -> HashMap<String, Vec<u8>> {
    let path = crate::common::fixtures().join("casts.safetensors");
    let tensors = tensorplace::load_file(&path, "cpu").unwrap();
    tensors
        .iter()
        .map(|(name, t)| (name.to_owned(), t.host_bytes().unwrap().into_owned()))
        .collect()
}

/// Every conversion with its input bytes and the reference's output bytes.
fn cases() -> Vec<(Conversion, Vec<u8>, Vec<u8>)> {
    let table = table();
    Conversion::ALL
        .iter()
        .map(|&c| {
            let input = table[&format!("in.{}", c.from())].clone();
            let want = table
                .get(&format!("{}.to.{}", c.from(), c.to()))
                .unwrap_or_else(|| panic!("the fixture lacks {c}"))
                .clone();
            assert_eq!(c.output_len(input.len()), Some(want.len()), "{c}");
            (c, input, want)
        })
        .collect()
}

/// [`cases`], and the narrowings of 64-bit integers (`Conversion::NARROWING`; F64 to F32 is in
/// the table) over edge values and pseudo-random patterns, their results from Rust's own `as`
/// casts (two's complement wrapping, as numpy's `astype`): what every kernel must give.
fn kernel_cases() -> Vec<(Conversion, Vec<u8>, Vec<u8>)> {
    let mut values: Vec<u64> = vec![
        0,
        1,
        u64::MAX,
        i64::MIN as u64,
        i64::MAX as u64,
        u32::MAX as u64,
        (u32::MAX as u64) + 1,
        (i32::MIN as i64) as u64,
        (i32::MAX as u64) + 1,
    ];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..4093 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        values.push(x);
    }
    let input: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = cases();
    for c in Conversion::NARROWING {
        let want: Vec<u8> = match (c.from(), c.to()) {
            (Dtype::I64, Dtype::I32) => values
                .iter()
                .flat_map(|&v| (v as i64 as i32).to_le_bytes())
                .collect(),
            (Dtype::U64, Dtype::U32) => values
                .iter()
                .flat_map(|&v| (v as u32).to_le_bytes())
                .collect(),
            _ => continue, // F64 to F32: in the table, against numpy
        };
        out.push((c, input.clone(), want));
    }
    out
}

/// Panics naming the first element where `got` differs from `want`.
fn assert_same(what: &str, c: Conversion, input: &[u8], got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: {c}: output length");
    let out = c.to().bits() / 8;
    let inb = c.from().bits() / 8;
    if let Some(i) =
        (0..want.len() / out).find(|&i| got[i * out..][..out] != want[i * out..][..out])
    {
        panic!(
            "{what}: {c}: element {i} (input {:02x?}) gave {:02x?}, ml_dtypes/numpy give {:02x?}",
            &input[i * inb..][..inb],
            &got[i * out..][..out],
            &want[i * out..][..out]
        );
    }
}

#[test]
fn the_fixture_covers_every_pattern_and_every_conversion() {
    let table = table();
    assert_eq!(table["in.F16"].len(), 2 << 16);
    assert_eq!(table["in.BF16"].len(), 2 << 16);
    assert_eq!(table["in.F8_E4M3"].len(), 256);
    assert!(table["in.F32"].len() > 4 * 20_000);
    assert!(table["in.F64"].len() > 8 * 20_000);
    assert_eq!(cases().len(), 21);
    assert!(Conversion::between(Dtype::F8_E4M3, Dtype::F16).is_some());
}

#[test]
fn the_cpu_reference_equals_ml_dtypes() {
    for (c, input, want) in cases() {
        let mut got = vec![0u8; want.len()];
        c.convert(&input, &mut got);
        assert_same("cpu", c, &input, &got, &want);
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn every_kernel_validates_with_naga() {
    for kernel in Kernel::all() {
        let source = kernel.module_source();
        let label = kernel.label();
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(&source)));
        let caps = if kernel.needs_f16 {
            naga::valid::Capabilities::SHADER_FLOAT16
        } else {
            naga::valid::Capabilities::empty()
        };
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(&source)));
        assert!(module.entry_points.iter().any(|e| e.name == "main"));
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn every_wgpu_kernel_equals_ml_dtypes_on_the_device() {
    let backend = match WgpuBackend::open(None, None) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIPPED every_wgpu_kernel_equals_ml_dtypes_on_the_device: no adapter: {e}");
            return;
        }
    };
    println!("wgpu adapter: {:?}", backend.info().name);
    for (c, input, want) in kernel_cases() {
        let got = backend
            .run_kernel(&Kernel::for_conversion(c, false), &input)
            .unwrap();
        assert_same("wgpu", c, &input, &got, &want);
        // An odd count: the last word is partial.
        let inb = c.from().bits() / 8;
        let n = input.len() / inb;
        if n > 3 {
            let cut = (n - 3) * inb;
            let got = backend.convert(c, &input[..cut]).unwrap();
            assert_same(
                "wgpu, odd count",
                c,
                &input,
                &got,
                &want[..c.output_len(cut).unwrap()],
            );
        }
    }
    // The native F16 kernel is used only where its self-check found it exact: that decision
    // must match what this exhaustive comparison finds.
    let c = Conversion::between(Dtype::F16, Dtype::F32).unwrap();
    let native = Kernel::for_conversion(c, true);
    if !backend.has_f16() {
        println!("SKIPPED {}: the adapter lacks SHADER_F16", native.label());
        return;
    }
    let table = table();
    let got = backend.run_kernel(&native, &table["in.F16"]).unwrap();
    let exact = got == table["F16.to.F32"];
    assert_eq!(backend.native_f16_verified(), exact);
    println!("{}: exact on this driver: {exact}", native.label());
}

/// The source of the CUDA kernels (`shaders/cuda/convert.cl`, compiled to the committed PTX)
/// compiled for this CPU with the host C compiler and run over the fixture: the algorithms
/// equal the reference without a GPU.
#[test]
fn cuda_kernel_source_equals_ml_dtypes_on_the_host() {
    let root = crate::common::root();
    let source = root.join("shaders/cuda/convert.cl");
    let dir = tempfile::tempdir().unwrap();
    let harness = dir.path().join("harness.c");
    let cases = kernel_cases();
    let names: Vec<String> = cases.iter().map(|(c, _, _)| c.kernel_name()).collect();
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
    const char *names[] = {{"{}"}};
    void (*kernels[])(const u32 *, u32 *, u64, u64) = {{{}}};
    if (argc != 7) return 2;
    int k = -1;
    for (int i = 0; i < {}; i++) if (!strcmp(argv[1], names[i])) k = i;
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
            source.display(),
            names.join("\", \""),
            names.join(", "),
            names.len(),
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
                "SKIPPED cuda_kernel_source_equals_ml_dtypes_on_the_host: no working C compiler ({cc}: {other:?})"
            );
            return;
        }
    }
    for (c, input, want) in &cases {
        let elements = input.len() / (c.from().bits() / 8);
        let kernel = c.kernel_name();
        let inp = dir.path().join(format!("{kernel}.in"));
        let outp = dir.path().join(format!("{kernel}.out"));
        std::fs::write(&inp, input).unwrap();
        let status = std::process::Command::new(&exe)
            .arg(&kernel)
            .arg(&inp)
            .arg(&outp)
            .arg(
                (elements as u64)
                    .div_ceil(c.elements_per_unit())
                    .to_string(),
            )
            .arg(elements.to_string())
            .arg(want.len().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "{kernel}");
        let got = std::fs::read(&outp).unwrap();
        assert_same("convert.cl on the host", *c, input, &got, want);
    }
    // The committed PTX holds every kernel.
    let ptx = std::fs::read_to_string(root.join("shaders/cuda/convert.ptx")).unwrap();
    for c in Conversion::with_kernels() {
        let k = c.kernel_name();
        assert!(
            ptx.contains(&format!(".entry {k}(")),
            "{k} missing from convert.ptx"
        );
    }
}

#[cfg(feature = "cuda")]
#[test]
fn every_cuda_kernel_equals_ml_dtypes_on_the_device() {
    let backend = match tensorplace::internals::CudaBackend::open(0) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIPPED every_cuda_kernel_equals_ml_dtypes_on_the_device: {e}");
            return;
        }
    };
    for (c, input, want) in kernel_cases() {
        let got = backend.convert(c, &input).unwrap();
        assert_same("cuda", c, &input, &got, &want);
    }
}
