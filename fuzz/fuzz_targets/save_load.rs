//! Save then load of generated tensors: what is saved loads back equal (names, dtypes,
//! shapes, bytes, metadata), and `save` writes the reference writer's bytes.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tensorplace::{Dtype, Metadata, Tensor, Tensors};

#[derive(Debug, Arbitrary)]
struct Spec {
    name: String,
    dtype: u8,
    shape: Vec<u8>,
    seed: u8,
}

#[derive(Debug, Arbitrary)]
struct Input {
    tensors: Vec<Spec>,
    metadata: Option<Vec<(String, String)>>,
}

fuzz_target!(|input: Input| {
    let mut tensors = Tensors::new();
    for spec in input.tensors.iter().take(16) {
        let dtype = Dtype::ALL[usize::from(spec.dtype) % Dtype::ALL.len()];
        let shape: Vec<usize> = spec
            .shape
            .iter()
            .take(4)
            .map(|&d| usize::from(d % 9))
            .collect();
        let numel: usize = shape.iter().product();
        let Some(len) = dtype.bytes_for(numel) else {
            continue;
        };
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ spec.seed)
            .collect();
        let t = Tensor::from_bytes(dtype, shape, &bytes).expect("sizes were computed to match");
        tensors.insert(spec.name.clone(), t);
    }
    let metadata: Option<Metadata> = input.metadata.map(|m| m.into_iter().collect());
    let Ok(bytes) = tensorplace::save(&tensors, metadata.as_ref()) else {
        return;
    };
    let back = tensorplace::load(&bytes, "cpu").expect("what we save loads");
    assert_eq!(back.len(), tensors.len());
    for (name, t) in tensors.iter() {
        let b = back.tensor(name).expect("every saved tensor is there");
        assert_eq!(
            (b.dtype(), b.shape(), b.as_bytes()),
            (t.dtype(), t.shape(), t.as_bytes())
        );
    }
    let given = metadata.is_some();
    let md = metadata.filter(|m| !m.is_empty());
    assert_eq!(back.metadata().filter(|m| !m.is_empty()), md.as_ref());
    // Without metadata (whose key order the reference's HashMap does not keep), the
    // reference writer gives the same bytes: it sorts the tensors the same way.
    if !given && !tensors.is_empty() {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, t)| {
                let dtype: safetensors::Dtype =
                    serde_json::from_str(&format!("\"{}\"", t.dtype().name())).expect("a dtype");
                let view = safetensors::tensor::TensorView::new(
                    dtype,
                    t.shape().to_vec(),
                    t.as_bytes().expect("host tensors"),
                )
                .expect("a valid view");
                (n.to_owned(), view)
            })
            .collect();
        let reference = safetensors::serialize(views, None).expect("the reference saves");
        assert_eq!(bytes, reference);
    }
});
