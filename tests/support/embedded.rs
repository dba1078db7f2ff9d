//! The embedded default config (`config/podproxy.toml`) moved onto loopback.

/// The embedded default config (`config/podproxy.toml`) with both listeners moved to
/// `127.0.0.1:0` and the upstreams pointed at test backends; everything else (timeouts,
/// routes, version-prefix stripping) exactly as shipped.
pub fn embedded_default_on_loopback(mlnode_url: &str, vllm_urls: &str) -> String {
    embedded_default_with_env(mlnode_url, vllm_urls, &[])
}

/// `embedded_default_on_loopback` with more of the embedded default's env vars set.
pub fn embedded_default_with_env(
    mlnode_url: &str,
    vllm_urls: &str,
    env: &[(&str, &str)],
) -> String {
    let text = proxy::config::EMBEDDED_DEFAULT;
    assert_eq!(
        text.matches("bind = \"0.0.0.0:").count(),
        2,
        "embedded default changed shape: expected two 0.0.0.0 listeners"
    );
    let text = text.replace("bind = \"0.0.0.0:", "bind = \"127.0.0.1:");
    proxy::config::env::expand(&text, |name| match name {
        "POC_PORT" | "INFERENCE_PORT" => Some("0".into()),
        "MLNODE_URL" => Some(mlnode_url.into()),
        "VLLM_URLS" => Some(vllm_urls.into()),
        "PODPROXY_ADMIN_BIND" => Some("127.0.0.1:0".into()),
        other => env
            .iter()
            .find(|(k, _)| *k == other)
            .map(|(_, v)| v.to_string()),
    })
    .expect("expand embedded default")
}
