//! Slices: any text parses to a slice or an `InvalidSlice` error (never a panic), and a load
//! with a generated slice gives the elements a naive reference picks (every element of the
//! tensor visited in order, kept where its index lies in the slice's ranges), or an error
//! exactly where the reference finds the slice invalid.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tensorplace::{Dtype, ErrorKind, Loader, Slice, SliceIndex, Tensor, Tensors};

#[derive(Debug, Arbitrary)]
enum Index {
    Range(Option<u8>, Option<u8>),
    At(i8),
    Ellipsis,
}

#[derive(Debug, Arbitrary)]
struct Input {
    text: String,
    dtype: u8,
    shape: Vec<u8>,
    indices: Vec<Index>,
}

/// The per-dimension ranges and kept dimensions the slice selects, or None where invalid.
fn reference(shape: &[usize], indices: &[Index]) -> Option<Vec<(usize, usize, bool)>> {
    let ellipses = indices.iter().filter(|i| matches!(i, Index::Ellipsis)).count();
    let given = indices.len() - ellipses;
    if ellipses > 1 || given > shape.len() {
        return None;
    }
    let mut out = Vec::new();
    for index in indices {
        match *index {
            Index::Ellipsis => {
                for _ in 0..shape.len() - given {
                    out.push((0, shape[out.len()], true));
                }
            }
            Index::At(i) => {
                let n = shape[out.len()] as i64;
                let i = i64::from(i);
                let at = if i < 0 { n + i } else { i };
                if at < 0 || at >= n {
                    return None;
                }
                out.push((at as usize, at as usize + 1, false));
            }
            Index::Range(a, b) => {
                let n = shape[out.len()];
                let a = a.map_or(0, usize::from);
                let b = b.map_or(n, usize::from);
                if b > n || a > b || (a >= n && n > 0) {
                    return None;
                }
                out.push((a, b, true));
            }
        }
    }
    while out.len() < shape.len() {
        out.push((0, shape[out.len()], true));
    }
    Some(out)
}

fuzz_target!(|input: Input| {
    match input.text.parse::<Slice>() {
        Ok(s) => assert!(s.to_string().parse::<Slice>().is_ok_and(|t| t == s)),
        Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidSlice),
    }
    // Whole-byte dtypes only: the reference picks elements by byte.
    let dtypes: Vec<Dtype> = Dtype::ALL.into_iter().filter(|d| d.bits() >= 8).collect();
    let dtype = dtypes[usize::from(input.dtype) % dtypes.len()];
    let elem = dtype.bits() / 8;
    let shape: Vec<usize> = input.shape.iter().take(4).map(|&d| usize::from(d % 7)).collect();
    let numel: usize = shape.iter().product();
    let bytes: Vec<u8> = (0..numel * elem).map(|i| (i % 251) as u8).collect();
    let mut tensors = Tensors::new();
    tensors.insert("t", Tensor::from_bytes(dtype, shape.clone(), &bytes).expect("sizes match"));
    let file = tensorplace::save(&tensors, None).expect("a tensor saves");
    let slice = Slice::new(
        input
            .indices
            .iter()
            .take(6)
            .map(|i| match *i {
                Index::Range(a, b) => SliceIndex::Range(a.map(usize::from), b.map(usize::from)),
                Index::At(i) => SliceIndex::At(i64::from(i)),
                Index::Ellipsis => SliceIndex::Ellipsis,
            })
            .collect::<Vec<_>>(),
    );
    let indices = &input.indices[..input.indices.len().min(6)];
    let got = Loader::new("cpu").slice("t", slice).load(&file);
    let Some(ranges) = reference(&shape, indices) else {
        let e = got.expect_err("the reference finds the slice invalid");
        assert_eq!(e.kind(), ErrorKind::InvalidSlice);
        return;
    };
    let got = got.expect("the reference finds the slice valid");
    let t = got.tensor("t").expect("the tensor is there");
    let want_shape: Vec<usize> = ranges.iter().filter(|r| r.2).map(|r| r.1 - r.0).collect();
    assert_eq!(t.shape(), &want_shape[..]);
    // Every element of the tensor, in order, kept where it lies in the ranges.
    let mut want = Vec::new();
    for k in 0..numel {
        let mut rest = k;
        let mut inside = true;
        for (d, &n) in shape.iter().enumerate().rev() {
            let i = rest % n;
            rest /= n;
            inside &= ranges[d].0 <= i && i < ranges[d].1;
        }
        if inside {
            want.extend_from_slice(&bytes[k * elem..(k + 1) * elem]);
        }
    }
    assert_eq!(t.as_bytes().expect("on the host"), &want[..]);
});
