//! The set-up the API suites share (issue 15): the server's state with its MQTT publisher and
//! HS256 verifier, the server on an ephemeral port, signed tokens and one request helper.
//! Each suite keeps its own harness (fields, secrets and tariffs differ); only this is common.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::auth::{Claims, JwtConfig, JwtVerifier, Role};
use api::publish::{Publisher, PublisherConfig};
use api::{ApiConfig, AppState};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use testkit::TestDatabase;

/// Token issuer the test servers accept.
pub(crate) const ISS: &str = "wm-test";
/// Token audience the test servers accept.
pub(crate) const AUD: &str = "wm-api";
/// How long a test waits for something asynchronous.
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

/// The API's command publisher on the test broker: client `{client_prefix}-<random>`, 4
/// partitions, topics under `topic_root`.
pub(crate) fn publisher(client_prefix: &str, topic_root: String) -> Arc<Publisher> {
    let model::BrokerUrl { host, port, .. } =
        pipeline::config::broker_url(&pipeline::config::mqtt_url()).expect("MQTT URL");
    Publisher::start(PublisherConfig {
        host,
        port,
        client_id: format!("{client_prefix}-{:08x}", rand::random::<u32>()),
        topic_root,
        partitions: 4,
        gateway: model::GatewayId::new("api-test").unwrap(),
        ack_timeout: Duration::from_secs(30),
    })
}

/// The server state on `db`: HS256 tokens under `secret` (and `jwks_url` when given), default
/// limits, no tariffs (suites that need them set `config` and `tariffs` afterwards).
pub(crate) fn app_state(
    db: &TestDatabase,
    secret: &[u8],
    jwks_url: Option<String>,
    publisher: Arc<Publisher>,
) -> AppState {
    AppState {
        pool: db.pool.clone(),
        jwt: Arc::new(JwtVerifier::new(JwtConfig {
            issuer: ISS.into(),
            audience: AUD.into(),
            hs256_secret: Some(secret.to_vec()),
            jwks_url,
            jwks_min_refresh: Duration::from_secs(60),
        })),
        publisher,
        metrics: Arc::default(),
        config: Arc::new(ApiConfig::default()),
        tariffs: None,
        calls: api::calllog::CallLog::start(db.pool.clone()),
    }
}

/// Serves `state` on an ephemeral local port; returns the base URL (`http://127.0.0.1:…`).
pub(crate) async fn serve(state: AppState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            api::app(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    format!("http://{addr}")
}

/// Who a token is for.
pub(crate) struct TokenFor<'a> {
    /// Subject.
    pub(crate) sub: &'a str,
    /// Roles.
    pub(crate) roles: &'a [Role],
    /// Organisation (`*`: all).
    pub(crate) org: &'a str,
    /// With a second factor (`amr: ["otp"]`).
    pub(crate) mfa: bool,
}

/// An HS256 token under `secret` for `who`, for audience `aud`, expiring in `exp_in` seconds.
pub(crate) fn sign(secret: &[u8], who: &TokenFor<'_>, aud: &str, exp_in: i64) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    api::auth::sign_hs256(
        secret,
        &Claims {
            sub: who.sub.into(),
            iss: ISS.into(),
            aud: aud.into(),
            exp: now + exp_in,
            iat: now,
            roles: who.roles.iter().map(|r| r.as_str().to_owned()).collect(),
            org: Some(who.org.into()),
            areas: Vec::new(),
            amr: if who.mfa { vec!["otp".into()] } else { vec![] },
        },
    )
    .unwrap()
}

/// One request to `{base}{path}` (JSON body, bearer token and extra headers when given): the
/// status, the body as JSON (a string when it is not JSON) and the response headers.
pub(crate) async fn request(
    http: &reqwest::Client,
    base: &str,
    (method, path): (Method, &str),
    token: Option<&str>,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value, HeaderMap) {
    let mut rb = http.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v, headers)
}

/// The text of `GET {base}/metrics`.
pub(crate) async fn metrics(http: &reqwest::Client, base: &str) -> String {
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
