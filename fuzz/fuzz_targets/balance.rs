//! The two parsers of LLM-aware balancing on untrusted bytes: a backend's `/metrics`
//! answer (`signals::parse`) and a client's request-body prefix (`affinity::prompt_key`).
//! Neither may panic; parsed figures are finite and the KV usage is within 0..=1.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(f) = proxy::upstream::signals::parse(data) {
        assert!(f.running.is_finite() && f.waiting.is_finite());
        assert!((0.0..=1.0).contains(&f.kv_usage));
    }
    let _ = proxy::upstream::affinity::prompt_key(data);
});
