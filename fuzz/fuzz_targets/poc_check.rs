//! The PoC body check with a configured callback origin: never panics, and a forwarded body
//! is itself accepted unchanged by a second check (the rewrite is idempotent).
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy::poc::{Poc, PocConfig, Verdict};

fuzz_target!(|data: &[u8]| {
    let poc = Poc::new(PocConfig {
        callback_origin: Some("http://10.0.0.5:9100".into()),
        ..PocConfig::default()
    });
    if let Verdict::Forward(out) = poc.check(bytes::Bytes::copy_from_slice(data)) {
        match poc.check(out.clone()) {
            Verdict::Forward(again) => assert_eq!(again, out, "rewrite not idempotent"),
            other => panic!("a forwarded body is refused on a second check: {other:?}"),
        }
    }
});
