//! Header parsing against the reference: never a panic; what we accept the `safetensors`
//! crate accepts, and what it accepts and we refuse is a duplicate name (the one rule we add).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensorplace::ErrorKind;
use tensorplace::internals::Header;

fuzz_target!(|data: &[u8]| {
    let ours = Header::parse(data);
    let reference = safetensors::SafeTensors::deserialize(data);
    match (&ours, &reference) {
        (Ok(h), Ok(r)) => {
            assert_eq!(h.tensors().len(), r.len());
            for (name, info) in h.tensors() {
                let t = r
                    .tensor(name)
                    .expect("the reference has every tensor we found");
                assert_eq!(t.shape(), info.shape.as_slice());
                assert_eq!(t.data().len(), info.len());
            }
        }
        (Ok(_), Err(e)) => panic!("we accept what the reference refuses: {e}"),
        (Err(e), Ok(_)) => assert_eq!(e.kind(), ErrorKind::DuplicateName, "{e}"),
        (Err(e), Err(_)) => assert!(e.kind().is_format(), "{e}"),
    }
});
