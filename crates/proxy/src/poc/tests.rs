use super::*;
use crate::config::poc::parse_origin;

/// A v1 `InitDto` as the DAPI sends it (numbers that a re-serialiser would change).
pub const V1_BODY: &str = r#"{"block_hash":"0x8f2c41aa","block_height":1284533,"public_key":"A1b2C3d4","batch_size":100,"r_target":1.4013564660458173,"fraud_threshold":1e-07,"params":{"dim":1792,"n_layers":64,"n_heads":64,"n_kv_heads":64,"vocab_size":8196,"ffn_dim_multiplier":10.0,"multiple_of":8192,"norm_eps":1e-05,"rope_theta":10000.0,"use_scaled_rope":false,"seq_len":256},"url":"http://api:9100/v1/poc-batches","node_id":3,"node_count":8}"#;

/// A v2 body: escaped-twice model id in the callback path, validation artifacts.
pub const V2_BODY: &str = "{\n  \"block_hash\": \"0x77\",\n  \"block_height\": 99,\n  \"public_key\": \"pk\",\n  \"node_id\": 0,\n  \"node_count\": 1,\n  \"url\": \"http://api:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8?x=1\",\n  \"params\": {\"model\": \"Qwen/Qwen3-32B-FP8\", \"seq_len\": 1024, \"r_target\": 0.5000000000000001},\n  \"validation\": {\"artifacts\": [{\"nonce\": 1, \"vector\": [1e-07, -0.0, 3.14159265358979]}], \"url\": \"http://keep.me/\"}\n}";

fn poc(origin: Option<&str>, mode: Mode, allowed: &[&str]) -> Poc {
    Poc::new(PocConfig {
        callback_origin: origin.map(|o| parse_origin(o).unwrap()),
        mode,
        allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
        ..PocConfig::default()
    })
}

fn forwarded(v: Verdict) -> String {
    match v {
        Verdict::Forward(b) => String::from_utf8(b.to_vec()).unwrap(),
        other => panic!("expected Forward, got {other:?}"),
    }
}

#[test]
fn v1_rewrite_changes_only_the_url_origin() {
    let p = poc(Some("http://203.0.113.7:9100"), Mode::Rewrite, &[]);
    let out = forwarded(p.check(Bytes::from_static(V1_BODY.as_bytes())));
    assert_eq!(
        out,
        V1_BODY.replace(
            "http://api:9100/v1/poc-batches",
            "http://203.0.113.7:9100/v1/poc-batches"
        )
    );
    assert_eq!(p.rewritten.get(), 1);
}

#[test]
fn v2_rewrite_keeps_escaped_path_query_and_nested_urls() {
    let p = poc(Some("https://node.example.com:9100/"), Mode::Rewrite, &[]);
    let out = forwarded(p.check(Bytes::from_static(V2_BODY.as_bytes())));
    assert_eq!(
        out,
        V2_BODY.replace(
            "http://api:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8?x=1",
            "https://node.example.com:9100/v2/poc-batches/Qwen%252FQwen3-32B-FP8?x=1"
        )
    );
    assert!(
        out.contains("\"url\": \"http://keep.me/\""),
        "nested url untouched"
    );
}

#[test]
fn already_correct_or_absent_url_passes_byte_for_byte() {
    let p = poc(Some("http://api:9100"), Mode::Reject, &[]);
    assert_eq!(
        forwarded(p.check(Bytes::from_static(V1_BODY.as_bytes()))),
        V1_BODY
    );
    for body in [
        r#"{"a":1}"#,
        r#"{}"#,
        r#"{"url":null}"#,
        "[1,2]",
        "  {\"x\": [\"url\"]}  ",
    ] {
        assert_eq!(forwarded(p.check(Bytes::from(body))), body);
    }
    assert_eq!(p.rewritten.get(), 0);
}

#[test]
fn reject_mode_refuses_foreign_origins() {
    let p = poc(Some("http://203.0.113.7:9100"), Mode::Reject, &[]);
    assert!(matches!(
        p.check(Bytes::from_static(V1_BODY.as_bytes())),
        Verdict::Refuse(_)
    ));
    let ok = V1_BODY.replace("http://api:9100", "HTTP://203.0.113.7:9100");
    assert_eq!(forwarded(p.check(Bytes::from(ok.clone()))), ok);
}

#[test]
fn allowlist_without_origin() {
    let p = poc(None, Mode::Rewrite, &["api", "10.0.0.5"]);
    assert_eq!(
        forwarded(p.check(Bytes::from_static(V1_BODY.as_bytes()))),
        V1_BODY
    );
    let foreign = V1_BODY.replace("http://api:9100", "http://evil.example:9100");
    assert!(matches!(p.check(Bytes::from(foreign)), Verdict::Refuse(_)));
    let sneaky = V1_BODY.replace("http://api:9100", "http://api@evil.example:9100");
    assert!(matches!(p.check(Bytes::from(sneaky)), Verdict::Refuse(_)));
}

#[test]
fn duplicate_and_escaped_keys_are_all_rewritten() {
    let p = poc(Some("http://n:9100"), Mode::Rewrite, &[]);
    let body = r#"{"url":"http://a:1/x","u\u0072l":"http://b:2/y?q"}"#;
    assert_eq!(
        forwarded(p.check(Bytes::from(body))),
        r#"{"url":"http://n:9100/x","u\u0072l":"http://n:9100/y?q"}"#
    );
}

#[test]
fn malformed_bodies_are_refused_not_forwarded() {
    let p = poc(Some("http://n:9100"), Mode::Rewrite, &[]);
    for body in [
        "{\"url\": \"http://a/\"",
        "not json",
        "",
        r#"{"url": 5}"#,
        r#"{"url": "ftp://x/y"}"#,
        r#"{"url": "/relative"}"#,
        r#"{"url": "http:///nohost"}"#,
    ] {
        assert!(
            matches!(p.check(Bytes::from(body)), Verdict::Malformed(_)),
            "{body}"
        );
    }
}

#[test]
fn strings_with_braces_and_escaped_quotes_do_not_confuse_the_scanner() {
    let p = poc(Some("http://n:9100"), Mode::Rewrite, &[]);
    let body =
        r#"{"a":"}\"{,","b":{"url":"http://x/"},"c":["]",{"d":"\\"}],"url":"http://old:1/p"}"#;
    assert_eq!(
        forwarded(p.check(Bytes::from(body))),
        body.replace("http://old:1/p", "http://n:9100/p")
    );
}

#[test]
fn origins_are_validated() {
    assert_eq!(
        parse_origin("http://1.2.3.4:9100/").unwrap(),
        "http://1.2.3.4:9100"
    );
    assert!(parse_origin("http://1.2.3.4:9100/v1").is_err());
    assert!(parse_origin("1.2.3.4:9100").is_err());
    assert!(parse_origin("").is_err());
}

#[test]
fn applies_only_to_post_on_listed_paths_when_active() {
    let p = poc(Some("http://n:9100"), Mode::Rewrite, &[]);
    assert!(p.applies(&Method::POST, "/api/v1/pow/init/generate"));
    assert!(p.applies(&Method::POST, "/api/v1/inference/pow/generate"));
    assert!(!p.applies(&Method::GET, "/api/v1/pow/init/generate"));
    assert!(!p.applies(&Method::POST, "/api/v1/pow/validate"));
    assert!(p.applies(&Method::POST, "/api/v1/pow/init"));
    assert!(p.applies(&Method::POST, "/api/v1/pow/init/%67enerate"));
    assert!(p.applies(&Method::POST, "/api/v1//pow/init/generate/"));
    assert!(p.applies(&Method::POST, "/api/v1/inference/pow/x/../generate"));
    assert!(!p.applies(&Method::POST, "/api/v1/pow/init/generate/extra"));
    let off = poc(None, Mode::Rewrite, &[]);
    assert!(!off.applies(&Method::POST, "/api/v1/pow/init/generate"));
}
