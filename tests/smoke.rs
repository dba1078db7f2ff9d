mod support;
use http_body_util::BodyExt;
use support::*;
use testkit::echo::EchoServer;

#[tokio::test]
async fn proxies_a_request() {
    let echo = EchoServer::start().await.unwrap();
    let proxy = Proxy::simple(&echo.url(), "").await;
    let client = testkit::client::http_client();
    let resp = client
        .request(
            http::Request::get(format!("{}/hello?x=1", proxy.url("main")))
                .body(testkit::client::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("/hello?x=1"));
    proxy.shutdown().await;
}
