//! `load(bytes)` on the CPU, as it is and cast to every target dtype: never a panic; a
//! success gives tensors whose sizes match their shapes and whose bytes (uncast) are the
//! file's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensorplace::internals::Header;
use tensorplace::{Dtype, Loader};

fuzz_target!(|data: &[u8]| {
    let plain = tensorplace::load(data, "cpu");
    if let Ok(tensors) = &plain {
        let header = Header::parse(data).expect("a loaded file has a valid header");
        for (name, info) in header.tensors() {
            let t = tensors.tensor(name).expect("every tensor is loaded");
            let range = header.file_range(info);
            assert_eq!(t.as_bytes(), Some(&data[range]));
        }
    }
    for to in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        if let Ok(tensors) = Loader::new("cpu").dtype(to).load(data) {
            assert!(plain.is_ok());
            for (_, t) in tensors.iter() {
                let numel: usize = t.shape().iter().product();
                assert_eq!(Some(t.len_bytes()), t.dtype().bytes_for(numel));
            }
        }
    }
});
