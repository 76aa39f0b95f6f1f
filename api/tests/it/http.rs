//! The API over real HTTP, PostgreSQL and Mosquitto: every endpoint with valid and invalid
//! input, RBAC route by route, signed pushes (and a replay refused), the audit chain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::auth::{Claims, Role};
use api::{ApiConfig, rbac};
use model::ReadingBatch;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testkit::TestDatabase;

use crate::common::{self, AUD, DEADLINE, ISS, TokenFor};

const SECRET: &[u8] = b"test-hs256-secret-0123456789";
const CLIENT: &str = "platform-a";
const CLIENT_SECRET: &str = "client-secret-0123456789";

const TARIFF: &str = r#"
name = "test tariff"
currency = "CNY"
effective_from = "2020-01-01"
tier_period = "month"
status = "example"
source = "test"

[[classes]]
id = "flat"
  [[classes.tiers]]
  prices = { water = "2.00" }

[[classes]]
id = "household"
base_persons = 4
extra_volume_per_person = "5"
  [[classes.tiers]]
  up_to = "20"
  prices = { water = "1.00" }
  [[classes.tiers]]
  prices = { water = "3.00" }
"#;

struct Harness {
    db: TestDatabase,
    base: String,
    http: reqwest::Client,
    root: String,
}

async fn start(name: &str) -> Harness {
    start_with(name, None).await
}

async fn start_with(name: &str, jwks_url: Option<String>) -> Harness {
    let db = TestDatabase::create().await;
    let root = testkit::names::unique_prefix(&format!("api-{name}"));
    let publisher = common::publisher("api-test", root.clone());
    let t0 = Instant::now();
    while !publisher.connected() {
        assert!(
            t0.elapsed() < DEADLINE,
            "publisher never connected to Mosquitto on 1883"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tariff = billing_core::Tariff::parse("test.toml", TARIFF).unwrap();
    let mut state = common::app_state(&db, SECRET, jwks_url, publisher);
    state.config = Arc::new(ApiConfig {
        max_body_bytes: 4 * 1024 * 1024,
        ..ApiConfig::default()
    });
    state.tariffs = Some(Arc::new(billing_core::TariffBook::new([tariff]).unwrap()));
    api::signing::upsert_client(&db.pool, CLIENT, CLIENT_SECRET, None)
        .await
        .unwrap();
    let base = common::serve(state).await;
    Harness {
        db,
        base,
        http: reqwest::Client::new(),
        root,
    }
}

fn token_with(roles: &[Role], org: &str, mfa: bool, exp_in: i64, aud: &str) -> String {
    let who = TokenFor {
        sub: "tester",
        roles,
        org,
        mfa,
    };
    common::sign(SECRET, &who, aud, exp_in)
}

fn token(roles: &[Role]) -> String {
    token_with(roles, "*", false, 3600, AUD)
}

impl Harness {
    async fn call(
        &self,
        method: Method,
        path: &str,
        tok: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (http, base) = (&self.http, &self.base);
        let (st, v, _) = common::request(http, base, (method, path), tok, body, &[]).await;
        (st, v)
    }

    async fn push(
        &self,
        body: &[u8],
        nonce: &str,
        ts: i64,
        key: Option<&str>,
    ) -> reqwest::Response {
        let sig = model::auth::sign_request(
            CLIENT_SECRET.as_bytes(),
            "POST",
            "/api/v1/push",
            ts,
            nonce,
            body,
        );
        let mut rb = self
            .http
            .post(format!("{}/api/v1/push", self.base))
            .header("content-type", "application/json")
            .header("x-client-id", CLIENT)
            .header("x-timestamp", ts.to_string())
            .header("x-nonce", nonce)
            .header("x-signature", sig)
            .body(body.to_vec());
        if let Some(k) = key {
            rb = rb.header("idempotency-key", k);
        }
        rb.send().await.unwrap()
    }

    /// The reading batches the API publishes, once subscribed.
    async fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<ReadingBatch> {
        let filter = format!("{}/readings/+", self.root);
        let testkit::mqtt::Subscriber { client, mut rx, .. } =
            testkit::mqtt::subscribe("api-sub", &[&filter]).await;
        let (tx, batches) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _client = client;
            while let Some((_, payload)) = rx.recv().await {
                let b: ReadingBatch = serde_json::from_slice(&payload).unwrap();
                if tx.send(b).is_err() {
                    return;
                }
            }
        });
        batches
    }
}

async fn collect(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<ReadingBatch>,
    readings: usize,
) -> Vec<ReadingBatch> {
    let mut out = Vec::new();
    let mut n = 0;
    while n < readings {
        let b = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("batches in time")
            .unwrap();
        n += b.entries.len();
        out.push(b);
    }
    assert_eq!(n, readings);
    out
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn nonce() -> String {
    format!(
        "n-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

async fn register(h: &Harness, no: &str, id: &str, org: &str, book: Option<&str>) {
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/meters",
            Some(&token(&[Role::MeterOperator])),
            Some(
                json!({"meter_no": no, "meter_id": id, "org": org, "area": "north",
                        "address": "1 River Road", "dma": "dma-1", "meter_book": book,
                        "customer_account": format!("acct-{no}"), "customer_class": "flat"}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn health_metrics_openapi_and_problem_json() {
    let h = start("ops").await;
    let (st, v) = h.call(Method::GET, "/healthz", None, None).await;
    assert_eq!((st, v), (StatusCode::OK, Value::String("ok".into())));
    let (st, _) = h.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, doc) = h
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(doc["openapi"].as_str().map(|s| &s[..2]), Some("3."));
    let tags: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|op| op["tags"][0].as_str().map(str::to_owned))
        .collect();
    for tag in [
        "IF-METER-004",
        "IF-REV-004",
        "IF-METER-001",
        "IF-METER-002",
        "EXT-601",
        "IF-REV-005",
    ] {
        assert!(tags.iter().any(|t| t == tag), "no operation tagged {tag}");
    }
    let ui = h
        .http
        .get(format!("{}/api/v1/docs/", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ui.status(), StatusCode::OK);
    assert!(ui.text().await.unwrap().contains("swagger"));
    // Unknown route and bad JSON: problem+json, never a 500.
    let resp = h
        .http
        .get(format!("{}/api/v1/nope", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let resp = h
        .http
        .post(format!("{}/api/v1/meters", h.base))
        .bearer_auth(token(&[Role::MeterAdmin]))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let p: Value = resp.json().await.unwrap();
    assert_eq!(p["code"], "bad_request");
    let (st, p) = h
        .call(
            Method::POST,
            "/api/v1/meters",
            Some(&token(&[Role::MeterAdmin])),
            Some(json!({"meter_no": 5})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("meter_no"), "{p}");
    let metrics = common::metrics(&h.http, &h.base).await;
    assert!(
        metrics.contains("api_requests_total{route=\"/healthz\",method=\"GET\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("api_request_duration_seconds_bucket{route=\"/readyz\""),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "api_request_errors_total{route=\"/api/v1/meters\",code=\"invalid_field\"} 1"
        ),
        "{metrics}"
    );
    h.db.drop_database().await;
}

#[tokio::test]
async fn bearer_tokens_are_checked_and_failures_counted() {
    let h = start("auth").await;
    let path = "/api/v1/meters";
    let (st, p) = h.call(Method::GET, path, None, None).await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_token"))
    );
    let expired = token_with(&[Role::MeterAdmin], "*", false, -3600, AUD);
    let (st, p) = h.call(Method::GET, path, Some(&expired), None).await;
    assert_eq!(
        (st, p["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("expired_token"))
    );
    let wrong_aud = token_with(&[Role::MeterAdmin], "*", false, 3600, "other");
    let (st, p) = h.call(Method::GET, path, Some(&wrong_aud), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(p["detail"].as_str().unwrap().contains("aud"), "{p}");
    let mut forged = token(&[Role::MeterAdmin]);
    // Another last signature character (A and E both leave base64url's padding bits zero).
    let last = forged.pop();
    forged.push(if last == Some('A') { 'E' } else { 'A' });
    let (st, _) = h.call(Method::GET, path, Some(&forged), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = h.call(Method::GET, path, Some("not-a-jwt"), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = h
        .call(Method::GET, path, Some(&token(&[Role::MeterAdmin])), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let metrics = common::metrics(&h.http, &h.base).await;
    assert!(
        metrics.contains("api_auth_failures_total{client=\"tester\",address=\"127.0.0.1\",reason=\"expired_token\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "api_auth_failures_total{client=\"-\",address=\"127.0.0.1\",reason=\"missing_token\"} 1"
    ));
    h.db.drop_database().await;
}

/// Every bearer route with a token of each role: allowed roles get past RBAC (any answer but
/// 401/403), the others get 403.
#[tokio::test]
async fn rbac_route_by_route() {
    let h = start("rbac").await;
    register(&h, "R-1", "cjt188:00000000000001", "org-a", None).await;
    let routes: Vec<(Method, &str, Option<Value>, &[Role])> = vec![
        (Method::GET, "/api/v1/meters", None, rbac::METERS_READ),
        (Method::GET, "/api/v1/meters/R-1", None, rbac::METERS_READ),
        (
            Method::POST,
            "/api/v1/meters",
            Some(json!({"meter_no": "", "meter_id": "x"})),
            rbac::METERS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/meters/R-404/install",
            Some(json!({})),
            rbac::METERS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/meters/R-404/activate",
            None,
            rbac::METERS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/meters/R-404/faulty",
            Some(json!({"reason": "x"})),
            rbac::METERS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/meters/R-404/retire",
            Some(json!({})),
            rbac::METERS_RETIRE,
        ),
        (
            Method::POST,
            "/api/v1/meters/R-404/replace",
            Some(json!({"old_final": "1", "new_initial": "0"})),
            rbac::METERS_WRITE,
        ),
        (
            Method::PUT,
            "/api/v1/meters/R-404/customer",
            Some(json!({"account": "a"})),
            rbac::METERS_WRITE,
        ),
        (
            Method::DELETE,
            "/api/v1/meters/R-404/customer",
            None,
            rbac::METERS_WRITE,
        ),
        (
            Method::PUT,
            "/api/v1/meters/R-404/book",
            Some(json!({"book": "b"})),
            rbac::METERS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/manual-reads",
            Some(json!({"reads": []})),
            rbac::MANUAL_READS,
        ),
        (
            Method::GET,
            "/api/v1/meters/R-1/readings",
            None,
            rbac::READINGS_READ,
        ),
        (
            Method::POST,
            "/api/v1/meters/R-404/readings/edit",
            Some(json!({"ts": "2026-01-01T00:00:00Z", "value": "1", "reason": "r"})),
            rbac::READINGS_EDIT,
        ),
        (Method::GET, "/api/v1/alarms", None, rbac::ALARMS_READ),
        (
            Method::POST,
            "/api/v1/alarms/999/ack",
            Some(json!({})),
            rbac::ALARMS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/alarms/999/close",
            Some(json!({})),
            rbac::ALARMS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/bill-runs",
            Some(json!({"book": "nope", "period_start": "2026-01-01", "period_end": "2026-02-01"})),
            rbac::BILL_RUN,
        ),
        (Method::GET, "/api/v1/jobs/999", None, rbac::BILLS_READ),
        (Method::GET, "/api/v1/bills", None, rbac::BILLS_READ),
        (Method::GET, "/api/v1/bills/999", None, rbac::BILLS_READ),
        (
            Method::POST,
            "/api/v1/arrears",
            Some(json!({"records": []})),
            rbac::ARREARS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/payments",
            Some(json!({"meter": "R-404", "account_id": "a"})),
            rbac::ARREARS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/tariffs/quote",
            Some(json!({"class": "flat", "usage": "1"})),
            rbac::QUOTE,
        ),
        (Method::GET, "/api/v1/audit", None, rbac::AUDIT_READ),
        (Method::GET, "/api/v1/audit/verify", None, rbac::AUDIT_READ),
        (
            Method::POST,
            "/api/v1/commands",
            Some(json!({"id": "c", "device": "R-404", "action": "valve_close", "reason": "r"})),
            rbac::COMMANDS_WRITE,
        ),
        (
            Method::GET,
            "/api/v1/commands/nope",
            None,
            rbac::COMMANDS_READ,
        ),
        (
            Method::GET,
            "/api/v1/meters/R-1/commands",
            None,
            rbac::COMMANDS_READ,
        ),
        (
            Method::POST,
            "/api/v1/commands/nope/cancel",
            None,
            rbac::COMMANDS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/commands/nope/retry",
            None,
            rbac::COMMANDS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/hydrant-permits",
            Some(json!({"id": "p", "hydrant": "H-404", "holder": "h",
                        "valid_from": "2026-01-01T00:00:00Z", "valid_to": "2026-01-02T00:00:00Z"})),
            rbac::COMMANDS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/hydrant-permits/nope/revoke",
            None,
            rbac::COMMANDS_WRITE,
        ),
        (
            Method::POST,
            "/api/v1/hydrants/H-404/unlock",
            Some(json!({})),
            rbac::COMMANDS_WRITE,
        ),
        // Dashboard reads (issue 23; their content is tested in tests/dashboard.rs).
        (
            Method::GET,
            "/api/v1/fleet/summary",
            None,
            rbac::DASHBOARD_READ,
        ),
        (Method::GET, "/api/v1/gateways", None, rbac::DASHBOARD_READ),
        (
            Method::GET,
            "/api/v1/dma/balance",
            None,
            rbac::DASHBOARD_READ,
        ),
        (Method::GET, "/api/v1/hydrants", None, rbac::COMMANDS_READ),
        (Method::GET, "/api/v1/commands", None, rbac::COMMANDS_READ),
        (Method::GET, "/api/v1/bill-runs", None, rbac::BILLS_READ),
        // max_s=0: the stream ends after its `ready` event.
        (
            Method::GET,
            "/api/v1/events?max_s=0",
            None,
            rbac::DASHBOARD_READ,
        ),
        (Method::GET, "/api/v1/approvals", None, rbac::APPROVALS_READ),
        (
            Method::GET,
            "/api/v1/approvals/999",
            None,
            rbac::APPROVALS_READ,
        ),
        (
            Method::POST,
            "/api/v1/approvals/999/approve",
            None,
            rbac::APPROVALS_READ,
        ),
        (
            Method::POST,
            "/api/v1/approvals/999/reject",
            None,
            rbac::APPROVALS_READ,
        ),
        (
            Method::POST,
            "/api/v1/meters/R-404/arrears-notices",
            Some(json!({"kind": "payment_demand", "sent_at": "2026-01-01T00:00:00Z"})),
            rbac::ARREARS_NOTICES_WRITE,
        ),
        (
            Method::GET,
            "/api/v1/arrears-notices",
            None,
            rbac::ARREARS_RULE_READ,
        ),
        (
            Method::GET,
            "/api/v1/meters/R-1/control-decisions",
            None,
            rbac::ARREARS_RULE_READ,
        ),
        (
            Method::GET,
            "/api/v1/arrears-closures/held",
            None,
            rbac::ARREARS_RULE_READ,
        ),
        (
            Method::POST,
            "/api/v1/arrears-closures/approve",
            Some(json!({"meters": ["R-404"]})),
            rbac::ARREARS_CLOSURES_APPROVE,
        ),
    ];
    // Every documented bearer route is in the table (the login is the one unauthenticated
    // route besides the signed push).
    let (_, doc) = h
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(p, _)| {
            p.starts_with("/api/v1/")
                && p.as_str() != "/api/v1/push"
                && p.as_str() != "/api/v1/auth/login"
        })
        .map(|(_, item)| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        routes.len(),
        "RBAC table and documented routes differ"
    );
    for (method, path, body, allowed) in &routes {
        for role in Role::ALL {
            // A second factor so high-risk routes show their role rule, not the factor rule.
            let tok = token_with(&[role], "*", true, 3600, AUD);
            let (st, v) = h.call(method.clone(), path, Some(&tok), body.clone()).await;
            if allowed.contains(&role) {
                assert!(
                    st != StatusCode::FORBIDDEN
                        && st != StatusCode::UNAUTHORIZED
                        && st.as_u16() < 500,
                    "{method} {path} as {}: {st} {v}",
                    role.as_str()
                );
            } else {
                assert_eq!(
                    st,
                    StatusCode::FORBIDDEN,
                    "{method} {path} as {}: {v}",
                    role.as_str()
                );
                assert_eq!(v["code"], "forbidden");
            }
        }
    }
    h.db.drop_database().await;
}

#[tokio::test]
async fn signed_push_is_durable_deduplicated_and_replay_proof() {
    let h = start("push").await;
    let mut rx = h.subscribe().await;
    let body = serde_json::to_vec(&json!({"reads": [
        {"meter": "cjt188:78330011223344", "ts": "2026-11-24T10:00:00Z", "value": "12.5", "unit": "m3"},
        {"meter": "cjt188:78330011223345", "ts": "2026-11-24T10:00:00Z", "value": "7", "unit": "m3"},
        {"meter": "mbus:ABC12345678", "ts": "2026-11-24T10:00:00Z", "quantity": "flow", "value": "0.3", "unit": "m3/h"},
    ], "frames": [
        {"hex": "FE FE FE FE 68 10 44 33 22 11 00 33 78 81 16 1F 90 00 00 77 66 55 2C 00 77 66 55 2C 31 01 22 11 05 15 20 21 84 13 16",
         "received_at": "2026-11-24T10:05:00Z"}
    ]})).unwrap();
    let n1 = nonce();
    let ts = now();
    let resp = h.push(&body, &n1, ts, Some("key-1")).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let a: Value = resp.json().await.unwrap();
    assert_eq!(a["items"], 4);
    let readings = a["readings"].as_u64().unwrap() as usize;
    assert!(readings >= 4, "{a}");
    let batches = collect(&mut rx, readings).await;
    let all: Vec<_> = batches.iter().flat_map(|b| b.entries.iter()).collect();
    assert!(
        batches
            .iter()
            .all(|b| b.gateway.as_str() == "api-test" && b.incarnation.is_some())
    );
    for b in &batches {
        for e in &b.entries {
            assert_eq!(e.reading.meter.partition(4), b.partition);
        }
    }
    let first = all
        .iter()
        .find(|e| {
            e.reading.meter.as_str() == "cjt188:78330011223344"
                && e.reading.value == rust_decimal::Decimal::new(125, 1)
        })
        .unwrap();
    assert_eq!(first.reading.provenance.source, model::SourceKind::HttpPush);
    assert_eq!(first.reading.provenance.source_id, CLIENT);
    let framed = all
        .iter()
        .find(|e| {
            e.reading.clock == model::ClockSource::Platform
                && e.reading.ts.unix_timestamp() == 1_795_514_700
        })
        .unwrap();
    assert_eq!(framed.reading.meter.as_str(), "cjt188:78330011223344");
    // Sequence numbers are unique and increasing per partition.
    let mut seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), all.len());

    // The same request again (captured and replayed): refused.
    let resp = h.push(&body, &n1, ts, Some("key-1")).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let p: Value = resp.json().await.unwrap();
    assert_eq!(p["code"], "replay");
    // A retry under the same Idempotency-Key gets the first answer, nothing is published again.
    let resp = h.push(&body, &nonce(), now(), Some("key-1")).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(resp.headers()["idempotent-replay"], "true");
    assert_eq!(resp.json::<Value>().await.unwrap(), a);
    // The same key with another body is refused.
    let other = br#"{"reads": [{"meter": "cjt188:78330011223344", "ts": "2026-11-24T11:00:00Z", "value": "13", "unit": "m3"}]}"#;
    let resp = h.push(other, &nonce(), now(), Some("key-1")).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Stale timestamp, bad signature, unknown client.
    let resp = h.push(other, &nonce(), now() - 301, None).await;
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "clock_skew");
    let sig = model::auth::sign_request(
        b"wrong-secret-0123456789",
        "POST",
        "/api/v1/push",
        now(),
        "n-aaaaaaaaaaaaaaaa",
        other,
    );
    let resp = h
        .http
        .post(format!("{}/api/v1/push", h.base))
        .header("x-client-id", CLIENT)
        .header("x-timestamp", now().to_string())
        .header("x-nonce", "n-aaaaaaaaaaaaaaaa")
        .header("x-signature", sig)
        .body(other.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "bad_signature");
    let resp = h
        .http
        .post(format!("{}/api/v1/push", h.base))
        .header("x-client-id", "nobody")
        .body(other.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap()["code"],
        "unknown_client"
    );
    // Invalid content names the field; a batch over 5000 is refused as too large.
    let bad = br#"{"reads": [{"meter": "cjt188:1", "ts": "2026-11-24T11:00:00Z", "value": "1", "unit": "m3"},
                             {"meter": "bad meter", "ts": "2026-11-24T11:00:00Z", "value": "1", "unit": "m3"}]}"#;
    let resp = h.push(bad, &nonce(), now(), None).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["field"],
        "reads[1].meter"
    );
    let resp = h
        .push(br#"{"frames": [{"hex": "68 zz"}]}"#, &nonce(), now(), None)
        .await;
    assert_eq!(
        resp.json::<Value>().await.unwrap()["field"],
        "frames[0].hex"
    );
    let resp = h.push(br#"{"reads": [{"meter": "m1", "ts": "2026-11-24T11:00:00Z", "value": "x", "unit": "m3"}]}"#, &nonce(), now(), None).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let big: Vec<Value> = (0..5001).map(|i| json!({"meter": format!("m{i}"), "ts": "2026-11-24T11:00:00Z", "value": "1", "unit": "m3"})).collect();
    let resp = h
        .push(
            &serde_json::to_vec(&json!({"reads": big})).unwrap(),
            &nonce(),
            now(),
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The nonce store is in PostgreSQL, shared by every node.
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM api_nonces WHERE client_id = $1")
        .bind(CLIENT)
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert!(n >= 5, "{n}");
    // Failures are counted per client and address.
    let metrics = common::metrics(&h.http, &h.base).await;
    assert!(metrics.contains("api_auth_failures_total{client=\"platform-a\",address=\"127.0.0.1\",reason=\"replay\"} 1"), "{metrics}");
    // The six-field call log (written behind).
    let t0 = Instant::now();
    loop {
        let rows: Vec<(String, String, i16, Option<String>, String)> = sqlx::query_as(
            "SELECT caller, request_digest, result, error_code, handler FROM api_call_log WHERE handler = '/api/v1/push' ORDER BY call_id")
            .fetch_all(&h.db.pool).await.unwrap();
        if rows.len() >= 10 {
            assert_eq!(rows[0].0, CLIENT);
            assert_eq!(rows[0].1.len(), 64);
            assert_eq!(rows[0].2, 202);
            assert_eq!(rows[1].3.as_deref(), Some("replay"));
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "call log has {} rows", rows.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.db.drop_database().await;
}

#[tokio::test]
async fn manual_reads_go_to_the_meters_partition() {
    let h = start("manual").await;
    register(&h, "M-1", "cjt188:00000000000011", "org-a", None).await;
    let mut rx = h.subscribe().await;
    let reader = token_with(&[Role::MeterReader], "org-a", false, 3600, AUD);
    let (st, v) = h
        .call(Method::POST, "/api/v1/manual-reads", Some(&reader), Some(json!({
            "device": "pda-7",
            "reads": [{"meter": "M-1", "ts": "2026-11-01T08:00:00Z", "value": "100.5", "photo_ref": "s3://photos/1.jpg"}]})))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let b = collect(&mut rx, 1).await.remove(0);
    assert_eq!(b.partition, model::partition_of("cjt188:00000000000011", 4));
    let r = &b.entries[0].reading;
    assert_eq!(r.clock, model::ClockSource::Manual);
    assert_eq!(r.provenance.source, model::SourceKind::Api);
    assert_eq!(r.provenance.source_id, "reader:tester@pda-7");
    assert_eq!(
        r.provenance.channel.as_deref(),
        Some("photo:s3://photos/1.jpg")
    );
    // A meter outside the reader's organisation, an empty batch, a negative value.
    let other = token_with(&[Role::MeterReader], "org-b", false, 3600, AUD);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/manual-reads",
            Some(&other),
            Some(json!({
        "reads": [{"meter": "M-1", "ts": "2026-11-01T08:00:00Z", "value": "1"}]})),
        )
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("reads[0].meter"))
    );
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/manual-reads",
            Some(&reader),
            Some(json!({"reads": []})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/manual-reads",
            Some(&reader),
            Some(json!({
        "reads": [{"meter": "M-1", "ts": "2026-11-01T08:00:00Z", "value": "-1"}]})),
        )
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("reads[0].value"))
    );
    h.db.drop_database().await;
}

#[tokio::test]
async fn registry_query_lifecycle_and_scope() {
    let h = start("registry").await;
    pipeline::registry::save_book(
        &h.db.pool,
        &pipeline::registry::Book {
            code: "B-2".into(),
            name: "book 2".into(),
            reader: None,
            cycle: pipeline::registry::Cycle::Monthly,
        },
        "test",
    )
    .await
    .unwrap();
    register(&h, "A-1", "cjt188:00000000000021", "org-a", None).await;
    register(&h, "B-1", "cjt188:00000000000022", "org-b", None).await;
    let op = token(&[Role::MeterOperator]);
    let a_only = token_with(&[Role::MeterOperator], "org-a", false, 3600, AUD);
    // IF-METER-001 filters and scope.
    let (st, v) = h
        .call(
            Method::GET,
            "/api/v1/meters?address=river&limit=10",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let (_, v) = h
        .call(Method::GET, "/api/v1/meters", Some(&a_only), None)
        .await;
    let nos: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["meter_no"].as_str().unwrap())
        .collect();
    assert_eq!(nos, ["A-1"]);
    let (_, v) = h
        .call(
            Method::GET,
            "/api/v1/meters?customer=acct-B-1",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(v["items"][0]["meter_id"], "cjt188:00000000000022");
    let (_, v) = h
        .call(
            Method::GET,
            "/api/v1/meters?status=in_stock&dma=dma-1&limit=1",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["next_offset"], 1);
    let (st, v) = h
        .call(Method::GET, "/api/v1/meters?status=broken", Some(&op), None)
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("status"))
    );
    let (st, _) = h
        .call(Method::GET, "/api/v1/meters?limit=0", Some(&op), None)
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let (st, _) = h
        .call(Method::GET, "/api/v1/meters?bogus=1", Some(&op), None)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, v) = h
        .call(Method::GET, "/api/v1/meters/B-1", Some(&a_only), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let (st, v) = h
        .call(
            Method::GET,
            "/api/v1/meters/cjt188:00000000000021",
            Some(&a_only),
            None,
        )
        .await;
    assert_eq!((st, v["meter_no"].as_str()), (StatusCode::OK, Some("A-1")));
    // A scoped operator registers only in its organisation.
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/meters",
            Some(&a_only),
            Some(json!({"meter_no": "X", "meter_id": "cjt188:00000000000099", "org": "org-b"})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Duplicates and bad fields.
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/meters",
            Some(&op),
            Some(json!({"meter_no": "A-1", "meter_id": "cjt188:00000000000098"})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/meters",
            Some(&op),
            Some(json!({"meter_no": "Z 1", "meter_id": "cjt188:00000000000097"})),
        )
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("meter_no"))
    );
    // IF-METER-002 lifecycle.
    let (st, v) = h
        .call(Method::POST, "/api/v1/meters/A-1/activate", Some(&op), None)
        .await;
    assert_eq!(
        st,
        StatusCode::CONFLICT,
        "in stock cannot be activated: {v}"
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/meters/A-1/install",
            Some(&op),
            Some(json!({"at": "2026-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(
        (st, v["status"].as_str()),
        (StatusCode::OK, Some("installed"))
    );
    let (_, v) = h
        .call(Method::POST, "/api/v1/meters/A-1/activate", Some(&op), None)
        .await;
    assert_eq!(v["status"], "active");
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/meters/A-1/faulty",
            Some(&op),
            Some(json!({"reason": " "})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, v) = h
        .call(
            Method::POST,
            "/api/v1/meters/A-1/faulty",
            Some(&op),
            Some(json!({"reason": "display dead"})),
        )
        .await;
    assert_eq!(v["status"], "faulty");
    let (_, v) = h
        .call(
            Method::PUT,
            "/api/v1/meters/A-1/customer",
            Some(&op),
            Some(json!({"account": "acct-new"})),
        )
        .await;
    assert_eq!(v["changed"], true);
    let (_, v) = h
        .call(
            Method::DELETE,
            "/api/v1/meters/A-1/customer",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(v["changed"], true);
    let (_, v) = h
        .call(
            Method::DELETE,
            "/api/v1/meters/A-1/customer",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(v["changed"], false);
    let (st, _) = h
        .call(
            Method::PUT,
            "/api/v1/meters/A-1/book",
            Some(&op),
            Some(json!({"book": "B-404"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let (st, _) = h
        .call(
            Method::PUT,
            "/api/v1/meters/A-1/book",
            Some(&op),
            Some(json!({"book": "B-2"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/meters/A-1/replace",
            Some(&op),
            Some(json!({"at": "2026-03-01T00:00:00Z", "old_final": "10", "new_initial": "0"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // Retire: admin only, with a second factor.
    let admin = token(&[Role::MeterAdmin]);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/meters/B-1/retire",
            Some(&admin),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("second_factor_required"))
    );
    let admin_mfa = token_with(&[Role::MeterAdmin], "*", true, 3600, AUD);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/meters/B-1/retire",
            Some(&admin_mfa),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (st, v["status"].as_str()),
        (StatusCode::OK, Some("retired"))
    );
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/meters/B-1/retire",
            Some(&admin_mfa),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    // Every change is in the audit log under the caller.
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit_log WHERE actor = 'api:tester' AND entity = 'meter'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert!(n >= 9, "{n}");
    h.db.drop_database().await;
}

#[tokio::test]
async fn readings_raw_rollups_csv_and_edit() {
    let h = start("readings").await;
    register(&h, "R-1", "cjt188:00000000000031", "org-a", None).await;
    let t0 = time::macros::datetime!(2026-10-01 00:00 UTC);
    let mut reads = Vec::new();
    for i in 0..5i64 {
        let mut r = testkit::volume_read(
            "cjt188:00000000000031",
            t0 + time::Duration::hours(i),
            rust_decimal::Decimal::new(1000 + i * 10, 1),
        );
        r.quality = model::Quality::Validated;
        reads.push(r);
    }
    pipeline::db::readings::insert_readings(&h.db.pool, &reads)
        .await
        .unwrap();
    // Hourly consumption is derived from the reads (migration 0151): R-2's reads give the two
    // rows the folded table held for this test before (1.5 m3 from 2 reads, then 0.5 m3 from
    // one estimate).
    register(&h, "R-2", "cjt188:00000000000032", "org-a", None).await;
    let estimate = model::Quality::Estimated {
        method: model::EstimationMethod::Linear,
    };
    let r2 = [
        (0, "100", model::Quality::Validated),
        (30, "101.5", model::Quality::Validated),
        (75, "102", estimate),
    ]
    .map(|(min, v, quality)| {
        let mut r = testkit::volume_read(
            "cjt188:00000000000032",
            t0 + time::Duration::minutes(min),
            v.parse().unwrap(),
        );
        r.quality = quality;
        r
    });
    pipeline::db::readings::insert_readings(&h.db.pool, &r2)
        .await
        .unwrap();
    sqlx::query("INSERT INTO rollup_daily (meter_id, bucket, consumption, first_value, last_value, read_count, estimated)
                 VALUES ('cjt188:00000000000031', '2026-10-01', 2, 100, 102, 3, false)")
        .execute(&h.db.pool).await.unwrap();
    let tok = token(&[Role::Billing]);
    let q = "from=2026-10-01T00:00:00Z&to=2026-10-02T00:00:00Z";
    let (st, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/meters/R-1/readings?{q}&limit=2"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    assert_eq!(v["items"][1]["value"], "101");
    assert_eq!(v["items"][0]["quality"], "validated");
    assert_eq!(v["next_offset"], 2);
    let (_, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/meters/R-1/readings?{q}&limit=2&offset=4"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert!(v.get("next_offset").is_none());
    let (_, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/meters/R-1/readings?{q}&resolution=hourly"),
            Some(&tok),
            None,
        )
        .await;
    let hours: Vec<(&str, &str, &str, i64)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["ts"].as_str().unwrap(),
                i["value"].as_str().unwrap(),
                i["quality"].as_str().unwrap(),
                i["count_or_tariff"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        hours,
        [
            ("2026-10-01T00:00:00Z", "0", "validated", 1),
            ("2026-10-01T01:00:00Z", "1", "validated", 1),
            ("2026-10-01T02:00:00Z", "1", "validated", 1),
            ("2026-10-01T03:00:00Z", "1", "validated", 1),
            ("2026-10-01T04:00:00Z", "1", "validated", 1),
        ]
    );
    let (st, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/meters/R-2/readings?{q}&resolution=hourly"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["items"][0]["value"], "1.5");
    assert_eq!(v["items"][0]["quality"], "validated");
    assert_eq!(v["items"][0]["count_or_tariff"], 2);
    assert_eq!(v["items"][1]["ts"], "2026-10-01T01:00:00Z");
    assert_eq!(v["items"][1]["value"], "0.5");
    assert_eq!(v["items"][1]["quality"], "estimated");
    assert_eq!(v["items"][1]["count_or_tariff"], 1);
    // A range starting inside the meter's history takes its base from the read before it.
    let (_, v) = h
        .call(
            Method::GET,
            "/api/v1/meters/R-2/readings?from=2026-10-01T01:00:00Z&to=2026-10-01T02:00:00Z&resolution=hourly",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["items"][0]["value"], "0.5");
    let (_, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/meters/R-1/readings?{q}&resolution=daily"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(v["items"][0]["value"], "2");
    assert_eq!(v["items"][0]["ts"], "2026-10-01T00:00:00Z");
    let resp = h
        .http
        .get(format!(
            "{}/api/v1/meters/R-1/readings?{q}&format=csv",
            h.base
        ))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = resp.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines[1],
        "cjt188:00000000000031,2026-10-01T00:00:00Z,volume,100,m3,validated,,0"
    );
    for bad in [
        "resolution=weekly",
        "from=yesterday",
        "from=2026-10-02T00:00:00Z&to=2026-10-01T00:00:00Z",
        "resolution=hourly&quantity=volume",
    ] {
        let (st, v) = h
            .call(
                Method::GET,
                &format!("/api/v1/meters/R-1/readings?{bad}"),
                Some(&tok),
                None,
            )
            .await;
        assert!(
            st == StatusCode::BAD_REQUEST || st == StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {st} {v}"
        );
    }
    let (st, _) = h
        .call(
            Method::GET,
            "/api/v1/meters/nope/readings",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Edit: admin with a second factor; audited; the old value answered.
    let admin = token_with(&[Role::MeterAdmin], "*", true, 3600, AUD);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/meters/R-1/readings/edit",
            Some(&token(&[Role::MeterAdmin])),
            Some(json!({"ts": "2026-10-01T01:00:00Z", "value": "101.2", "reason": "misread"})),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("second_factor_required"))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/meters/R-1/readings/edit",
            Some(&admin),
            Some(json!({"ts": "2026-10-01T01:00:00Z", "value": "101.2", "reason": "misread"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["old_value"], "101");
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/meters/R-1/readings/edit",
            Some(&admin),
            Some(json!({"ts": "2026-10-09T01:00:00Z", "value": "1", "reason": "x"})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    h.db.drop_database().await;
}

#[tokio::test]
async fn alarms_list_acknowledge_close() {
    let h = start("alarms").await;
    register(&h, "AL-1", "cjt188:00000000000041", "org-a", None).await;
    let (id,): (i64,) = sqlx::query_as("INSERT INTO alarms (meter_id, kind, severity, raised_at, detail) VALUES
        ('cjt188:00000000000041', 'leak', 'major', '2026-10-01T00:00:00Z', '{}') RETURNING alarm_id")
        .fetch_one(&h.db.pool).await.unwrap();
    sqlx::query("INSERT INTO alarms (meter_id, kind, severity, raised_at) VALUES ('cjt188:unregistered', 'burst', 'critical', '2026-10-02T00:00:00Z')")
        .execute(&h.db.pool).await.unwrap();
    let op = token(&[Role::MeterOperator]);
    let (st, v) = h.call(Method::GET, "/api/v1/alarms", Some(&op), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let scoped = token_with(&[Role::MeterOperator], "org-a", false, 3600, AUD);
    let (_, v) = h
        .call(
            Method::GET,
            "/api/v1/alarms?state=open&kind=leak",
            Some(&scoped),
            None,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["alarm_id"], id);
    let (st, _) = h
        .call(Method::GET, "/api/v1/alarms?state=weird", Some(&op), None)
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let other = token_with(&[Role::MeterOperator], "org-b", false, 3600, AUD);
    let (st, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/alarms/{id}/ack"),
            Some(&other),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/alarms/{id}/ack"),
            Some(&scoped),
            Some(json!({"note": "crew sent"})),
        )
        .await;
    assert_eq!(
        (st, v["state"].as_str()),
        (StatusCode::OK, Some("acknowledged"))
    );
    let (st, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/alarms/{id}/ack"),
            Some(&scoped),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/alarms/{id}/close"),
            Some(&scoped),
            Some(json!({})),
        )
        .await;
    assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("closed")));
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/alarms/abc/close",
            Some(&scoped),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM audit_log WHERE entity = 'alarm' AND entity_id = $1")
            .bind(id.to_string())
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(n, 2);
    h.db.drop_database().await;
}

#[tokio::test]
async fn billing_quote_run_bills_arrears() {
    let h = start("billing").await;
    let billing = token(&[Role::Billing]);
    // Quote: a class without a per-person allowance needs no persons.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/tariffs/quote",
            Some(&billing),
            Some(json!({"class": "flat", "usage": "10", "date": "2026-01-15"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["total"], "20.00");
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/tariffs/quote",
            Some(&billing),
            Some(json!({"class": "household", "usage": "30"})),
        )
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("persons"))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/tariffs/quote",
            Some(&billing),
            Some(json!({"class": "household", "usage": "30", "persons": 6})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // Six persons lift the first bound from 20 to 30 m3: all 30 m3 at 1.00.
    assert_eq!(v["total"], "30.00", "{v}");
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/tariffs/quote",
            Some(&billing),
            Some(json!({"class": "nope", "usage": "1"})),
        )
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("class"))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/tariffs/quote",
            Some(&billing),
            Some(json!({"class": "flat", "usage": "-1"})),
        )
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("usage"))
    );

    // A bill run as a job.
    pipeline::registry::save_book(
        &h.db.pool,
        &pipeline::registry::Book {
            code: "BK".into(),
            name: "bk".into(),
            reader: None,
            cycle: pipeline::registry::Cycle::Monthly,
        },
        "test",
    )
    .await
    .unwrap();
    register(&h, "BL-1", "cjt188:00000000000051", "org-a", Some("BK")).await;
    let op = token(&[Role::MeterOperator]);
    h.call(
        Method::POST,
        "/api/v1/meters/BL-1/install",
        Some(&op),
        Some(json!({"at": "2026-01-01T00:00:00Z"})),
    )
    .await;
    h.call(
        Method::POST,
        "/api/v1/meters/BL-1/activate",
        Some(&op),
        None,
    )
    .await;
    let mut reads = Vec::new();
    for (ts, v) in [
        (time::macros::datetime!(2026-02-28 15:00 UTC), 100i64),
        (time::macros::datetime!(2026-03-31 15:00 UTC), 112),
    ] {
        let mut r =
            testkit::volume_read("cjt188:00000000000051", ts, rust_decimal::Decimal::from(v));
        r.quality = model::Quality::Validated;
        reads.push(r);
    }
    pipeline::db::readings::insert_readings(&h.db.pool, &reads)
        .await
        .unwrap();
    let run = json!({"book": "BK", "period_start": "2026-03-01", "period_end": "2026-04-01"});
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/bill-runs",
            Some(&billing),
            Some(run.clone()),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_i64().unwrap();
    let t0 = Instant::now();
    let done = loop {
        let (_, j) = h
            .call(
                Method::GET,
                &format!("/api/v1/jobs/{job}"),
                Some(&billing),
                None,
            )
            .await;
        if j["state"] != "running" {
            break j;
        }
        assert!(t0.elapsed() < DEADLINE, "job still running: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(
        done["result"]["created"].as_array().unwrap().len(),
        1,
        "{done}"
    );
    assert_eq!(done["done"], 1);
    let (_, bills) = h
        .call(
            Method::GET,
            "/api/v1/bills?meter=BL-1",
            Some(&billing),
            None,
        )
        .await;
    let bill_id = bills["items"][0]["bill_id"].as_i64().unwrap();
    assert_eq!(bills["items"][0]["usage_m3"], "12.000000");
    let (st, b) = h
        .call(
            Method::GET,
            &format!("/api/v1/bills/{bill_id}"),
            Some(&billing),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b["total"], "24.00");
    assert_eq!(b["lines"][0]["component"], "water");
    let (st, _) = h
        .call(Method::GET, "/api/v1/bills/999999", Some(&billing), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Rerun of the same cycle: second factor.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/bill-runs",
            Some(&billing),
            Some(run.clone()),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("second_factor_required"))
    );
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/bill-runs",
            Some(&billing),
            Some(json!({"book": "BK", "period_start": "2026-03-01", "period_end": "2026-03-01"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/bill-runs",
            Some(&billing),
            Some(json!({"book": "BK", "period_start": "March", "period_end": "2026-03-01"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    // Arrears and payment; clearing two at once needs a second factor.
    register(&h, "BL-2", "cjt188:00000000000052", "org-a", Some("BK")).await;
    let (st, v) = h.call(Method::POST, "/api/v1/arrears", Some(&billing), Some(json!({"records": [
        {"meter": "BL-1", "account_id": "acct-BL-1", "amount_overdue": "88.50", "overdue_since": "2026-02-01"},
        {"meter": "BL-2", "account_id": "acct-BL-2", "amount_overdue": "10", "overdue_since": "2026-02-01"}]}))).await;
    assert_eq!(
        (st, v["recorded"].as_u64()),
        (StatusCode::OK, Some(2)),
        "{v}"
    );
    let (st, v) = h.call(Method::POST, "/api/v1/arrears", Some(&billing), Some(json!({"records": [
        {"meter": "BL-1", "account_id": "a", "amount_overdue": "1.001", "overdue_since": "2026-02-01"}]}))).await;
    assert_eq!(
        (st, v["field"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("records[0].amount_overdue")
        )
    );
    let (st, v) = h.call(Method::POST, "/api/v1/arrears", Some(&billing), Some(json!({"records": [
        {"meter": "BL-1", "account_id": "acct-BL-1", "amount_overdue": "0", "overdue_since": "2026-02-01"},
        {"meter": "BL-2", "account_id": "acct-BL-2", "amount_overdue": "0", "overdue_since": "2026-02-01"}]}))).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("second_factor_required"))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/payments",
            Some(&billing),
            Some(json!({"meter": "BL-1", "account_id": "acct-BL-1"})),
        )
        .await;
    assert_eq!(
        (st, v["cleared"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{v}"
    );
    assert!(
        pipeline::billing::arrears_of(&h.db.pool, "cjt188:00000000000051")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        pipeline::billing::arrears_of(&h.db.pool, "cjt188:00000000000052")
            .await
            .unwrap()
            .is_some()
    );
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/payments",
            Some(&billing),
            Some(json!({"meter": "BL-404", "account_id": "x"})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    h.db.drop_database().await;
}

#[tokio::test]
async fn audit_chain_detects_changed_deleted_and_inserted_rows() {
    let h = start("audit").await;
    for i in 0..4 {
        register(
            &h,
            &format!("AU-{i}"),
            &format!("cjt188:0000000000006{i}"),
            "org-a",
            None,
        )
        .await;
    }
    let auditor = token(&[Role::Auditor]);
    let (st, v) = h
        .call(Method::GET, "/api/v1/audit/verify", Some(&auditor), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["intact"], true, "{v}");
    assert_eq!(v["rows"], 4);
    let (_, v) = h
        .call(
            Method::GET,
            "/api/v1/audit?entity=meter&limit=2",
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    assert_eq!(v["items"][0]["chain_seq"], 4);
    // Append-only for ordinary sessions.
    let refused = sqlx::query("UPDATE audit_log SET actor = 'x' WHERE chain_seq = 2")
        .execute(&h.db.pool)
        .await;
    assert!(refused.unwrap_err().to_string().contains("append-only"));
    let refused = sqlx::query("DELETE FROM audit_log WHERE chain_seq = 2")
        .execute(&h.db.pool)
        .await;
    assert!(refused.is_err());
    // A superuser bypassing the triggers: each tampering is found.
    async fn tamper(pool: &sqlx::PgPool, sql: &str) {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SET session_replication_role = replica")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
        sqlx::query("SET session_replication_role = origin")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    async fn kinds(pool: &sqlx::PgPool) -> Vec<String> {
        let r = api::audit::verify(pool).await.unwrap();
        assert!(!r.intact);
        r.findings.into_iter().map(|f| f.kind).collect()
    }
    tamper(
        &h.db.pool,
        "UPDATE audit_log SET actor = 'mallory' WHERE chain_seq = 2",
    )
    .await;
    assert_eq!(kinds(&h.db.pool).await, ["changed"]);
    tamper(
        &h.db.pool,
        "UPDATE audit_log SET actor = 'api:tester' WHERE chain_seq = 2",
    )
    .await;
    assert!(api::audit::verify(&h.db.pool).await.unwrap().intact);
    tamper(&h.db.pool, "DELETE FROM audit_log WHERE chain_seq = 3").await;
    assert!(kinds(&h.db.pool).await.contains(&"deleted".to_owned()));
    let db2 = start("audit2").await;
    register(&db2, "AV-1", "cjt188:00000000000071", "org-a", None).await;
    register(&db2, "AV-2", "cjt188:00000000000072", "org-a", None).await;
    tamper(&db2.db.pool, "INSERT INTO audit_log (actor, action, entity, entity_id) VALUES ('mallory', 'x', 'meter', 'y')").await;
    assert_eq!(kinds(&db2.db.pool).await, ["inserted"]);
    let db3 = start("audit3").await;
    register(&db3, "AW-1", "cjt188:00000000000081", "org-a", None).await;
    register(&db3, "AW-2", "cjt188:00000000000082", "org-a", None).await;
    tamper(&db3.db.pool, "DELETE FROM audit_log WHERE chain_seq = 2").await;
    assert_eq!(kinds(&db3.db.pool).await, ["head_mismatch"]);
    h.db.drop_database().await;
    db2.db.drop_database().await;
    db3.db.drop_database().await;
}

type StoredRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
);

/// The whole path: a signed push and a manual read are accepted, carried by the broker to a
/// real pipeline worker, validated there and stored.
#[tokio::test]
async fn pushed_and_manual_reads_are_stored_by_the_worker() {
    use pipeline::ingest::IngestMetrics;
    use pipeline::worker::{self, WorkerConfig};
    let h = start("e2e").await;
    register(&h, "E-1", "cjt188:00000000000091", "org-a", None).await;
    let op = token(&[Role::MeterOperator]);
    h.call(
        Method::POST,
        "/api/v1/meters/E-1/install",
        Some(&op),
        Some(json!({"at": "2026-01-01T00:00:00Z"})),
    )
    .await;
    h.call(Method::POST, "/api/v1/meters/E-1/activate", Some(&op), None)
        .await;
    let mut config = WorkerConfig::new(&pipeline::config::mqtt_url(), &h.root, 0, 1, 4).unwrap();
    let client_id = format!("api-e2e-worker-{:08x}", rand::random::<u32>());
    config.client_id = client_id.clone();
    let metrics = Arc::new(IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(worker::run(config, h.db.pool.clone(), metrics, shutdown));

    let t = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        - time::Duration::hours(2);
    let ts = t
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let ts2 = (t + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let push = serde_json::to_vec(&json!({"reads": [
        {"meter": "cjt188:00000000000091", "ts": ts, "value": "10.5", "unit": "m3"}]}))
    .unwrap();
    let reader = token(&[Role::MeterReader]);
    let manual = json!({"reads": [{"meter": "E-1", "ts": ts2, "value": "11", "photo_ref": "p-1"}]});
    // Until the worker has subscribed a publish may find no session: re-send (the worker
    // deduplicates) until both rows are stored.
    let t0 = Instant::now();
    let rows =
        loop {
            assert_eq!(
                h.push(&push, &nonce(), now(), None).await.status(),
                StatusCode::ACCEPTED
            );
            let (st, _) = h
                .call(
                    Method::POST,
                    "/api/v1/manual-reads",
                    Some(&reader),
                    Some(manual.clone()),
                )
                .await;
            assert_eq!(st, StatusCode::ACCEPTED);
            let wait = Instant::now();
            let mut rows: Vec<StoredRow> = Vec::new();
            while wait.elapsed() < Duration::from_secs(3) {
                rows = sqlx::query_as(
                "SELECT value::text, clock, source, source_id, gateway_id, channel FROM readings
                 WHERE meter_id = 'cjt188:00000000000091' ORDER BY ts")
                .fetch_all(&h.db.pool).await.unwrap();
                if rows.len() == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if rows.len() == 2 {
                break rows;
            }
            assert!(t0.elapsed() < DEADLINE, "stored: {rows:?}");
        };
    assert_eq!(rows[0].0, "10.500000");
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2.as_str(), rows[0].3.as_str()),
        ("platform", "http_push", CLIENT)
    );
    assert_eq!(rows[0].4.as_deref(), Some("api-test"));
    assert_eq!((rows[1].1.as_str(), rows[1].2.as_str()), ("manual", "api"));
    assert_eq!(rows[1].5.as_deref(), Some("photo:p-1"));
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    worker::forget_session(&pipeline::config::mqtt_url(), &client_id)
        .await
        .unwrap();
    h.db.drop_database().await;
}

fn rs256_token(der: &[u8], kid: &str, roles: &[Role]) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    let claims = Claims {
        sub: "rs-user".into(),
        iss: ISS.into(),
        aud: AUD.into(),
        exp: now + 600,
        iat: now,
        roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
        org: Some("*".into()),
        areas: Vec::new(),
        amr: Vec::new(),
    };
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(der),
    )
    .unwrap()
}

/// RS256 tokens verified with keys fetched from a JWKS URL (an identity provider's), by kid.
#[tokio::test]
async fn rs256_tokens_with_keys_from_a_jwks_url() {
    let n = include_str!("fixtures/rs256-test-n.txt").trim().to_owned();
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "n": n, "e": "AQAB"}]});
    let idp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp_addr = idp.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let jwks = jwks.clone();
                async move { axum::Json(jwks) }
            }),
        );
        axum::serve(idp, app).await.unwrap();
    });
    let h = start_with("rs256", Some(format!("http://{idp_addr}/jwks.json"))).await;
    let key = include_bytes!("fixtures/rs256-test-key.der");
    let other = include_bytes!("fixtures/rs256-other-key.der");
    let (st, v) = h
        .call(
            Method::GET,
            "/api/v1/meters",
            Some(&rs256_token(key, "k1", &[Role::Auditor])),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = h
        .call(
            Method::GET,
            "/api/v1/meters",
            Some(&rs256_token(other, "k1", &[Role::Auditor])),
            None,
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_token")),
        "{v}"
    );
    let (st, v) = h
        .call(
            Method::GET,
            "/api/v1/meters",
            Some(&rs256_token(key, "k9", &[Role::Auditor])),
            None,
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unknown_key")),
        "{v}"
    );
    // RBAC applies to RS256 callers alike.
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/meters/X/activate",
            Some(&rs256_token(key, "k1", &[Role::Auditor])),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    h.db.drop_database().await;
}

/// A signing client bound to an organisation pushes only for that organisation's meters.
#[tokio::test]
async fn a_scoped_client_pushes_only_its_organisations_meters() {
    let h = start("push-scope").await;
    register(&h, "S-1", "cjt188:00000000000101", "org-a", None).await;
    register(&h, "S-2", "cjt188:00000000000102", "org-b", None).await;
    let secret = "scoped-client-secret-01";
    api::signing::upsert_client(&h.db.pool, "scoped", secret, Some("org-a"))
        .await
        .unwrap();
    let send = |meter: &'static str| {
        let body = serde_json::to_vec(&json!({"reads": [
            {"meter": meter, "ts": "2026-11-24T10:00:00Z", "value": "1", "unit": "m3"}]}))
        .unwrap();
        let n = nonce();
        let ts = now();
        let sig =
            model::auth::sign_request(secret.as_bytes(), "POST", "/api/v1/push", ts, &n, &body);
        h.http
            .post(format!("{}/api/v1/push", h.base))
            .header("x-client-id", "scoped")
            .header("x-timestamp", ts.to_string())
            .header("x-nonce", n)
            .header("x-signature", sig)
            .body(body)
            .send()
    };
    assert_eq!(
        send("cjt188:00000000000101").await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    for other in ["cjt188:00000000000102", "cjt188:00000000000199"] {
        let resp = send(other).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{other}");
    }
    h.db.drop_database().await;
}

/// A registered device made ready for commands: active, with a serving gateway (and a valve).
async fn commandable(h: &Harness, no: &str, id: &str, org: &str) {
    register(h, no, id, org, None).await;
    sqlx::query(
        "UPDATE meters SET status = 'active', gateway_id = 'gw-1', has_valve = $2 WHERE meter_id = $1",
    )
    .bind(id)
    .bind(!id.starts_with("hydrant:"))
    .execute(&h.db.pool)
    .await
    .unwrap();
}

fn rfc(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test]
async fn commands_issue_idempotently_bound_cancel_retry_and_show_history() {
    let h = start("commands").await;
    commandable(&h, "V-1", "cjt188:00000000000011", "org-a").await;
    commandable(&h, "V-2", "cjt188:00000000000012", "org-a").await;
    let op = token(&[Role::MeterOperator]);
    let op_mfa = token_with(&[Role::MeterOperator], "*", true, 3600, AUD);
    let close = |id: &str, dev: &str| json!({"id": id, "device": dev, "action": "valve_close", "reason": "leak at the stopcock"});
    // Valve close is high-risk: no second factor, no command.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/commands",
            Some(&op),
            Some(close("c-1", "V-1")),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("second_factor_required")),
        "{v}"
    );
    let (st, first) = h
        .call(
            Method::POST,
            "/api/v1/commands",
            Some(&op_mfa),
            Some(close("c-1", "V-1")),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{first}");
    assert_eq!(first["created"], true);
    assert_eq!(first["command"]["state"], "queued");
    assert_eq!(first["command"]["device"], "cjt188:00000000000011");
    assert_eq!(first["command"]["action_type"], "valve_close");
    assert_eq!(first["command"]["issued_by"], "api:tester");
    // The same id again: the first command, nothing new.
    let (st, again) = h
        .call(
            Method::POST,
            "/api/v1/commands",
            Some(&op_mfa),
            Some(close("c-1", "V-1")),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{again}");
    assert_eq!(again["created"], false);
    assert_eq!(again["command"]["issued_at"], first["command"]["issued_at"]);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM commands WHERE command_id = 'c-1'")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    // The same id for another action is a conflict, not a second command.
    let mut other = close("c-1", "V-1");
    other["action"] = json!("valve_open");
    let (st, v) = h
        .call(Method::POST, "/api/v1/commands", Some(&op_mfa), Some(other))
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    // Refusals name the field; none is a 500.
    let bad: Vec<(Value, StatusCode, Option<&str>)> = vec![
        (close("c-x", "NO-SUCH"), StatusCode::NOT_FOUND, None),
        (
            json!({"id": "c-x", "device": "V-1", "action": "explode", "reason": "r"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("action"),
        ),
        (
            json!({"id": "c-x", "device": "V-1", "action": "hydrant_lock", "reason": "r"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("action"),
        ),
        (
            json!({"id": "c-x", "device": "V-1", "action": {"type": "hydrant_unlock", "duration_s": 60}, "reason": "r"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("action"),
        ),
        (
            json!({"id": "c-x", "device": "V-1", "action": "valve_open", "reason": "r", "priority": 12}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("priority"),
        ),
        (
            json!({"id": "", "device": "V-1", "action": "valve_open", "reason": "r"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("id"),
        ),
        (
            json!({"id": "c-x", "device": "V-1", "action": "valve_open", "reason": " "}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("reason"),
        ),
    ];
    for (body, status, field) in bad {
        let (st, v) = h
            .call(
                Method::POST,
                "/api/v1/commands",
                Some(&op_mfa),
                Some(body.clone()),
            )
            .await;
        assert_eq!((st, v["field"].as_str()), (status, field), "{body}: {v}");
    }
    // The per-device bound: 20 pending (sent, so none supersedes another), the 21st refused.
    for i in 0..20 {
        let id = format!("b-{i}");
        let mut body = close(&id, "V-2");
        body["action"] = json!(if i % 2 == 0 {
            "valve_close"
        } else {
            "valve_open"
        });
        let (st, v) = h
            .call(Method::POST, "/api/v1/commands", Some(&op_mfa), Some(body))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{id}: {v}");
        sqlx::query(
            "UPDATE commands SET state = 'sent', published_at = now() WHERE command_id = $1",
        )
        .bind(&id)
        .execute(&h.db.pool)
        .await
        .unwrap();
    }
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/commands",
            Some(&op_mfa),
            Some(close("b-20", "V-2")),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "conflict");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("20 pending") && detail.contains("b-20"),
        "{detail}"
    );
    // Cancel: never published, so withdrawn at once; a second cancel is refused.
    let (st, v) = h
        .call(Method::POST, "/api/v1/commands/c-1/cancel", Some(&op), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["outcome"].as_str(), v["state"].as_str()),
        (Some("withdrawn"), Some("cancelled"))
    );
    let (st, v) = h
        .call(Method::POST, "/api/v1/commands/c-1/cancel", Some(&op), None)
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    // A published command is cancelled by a cancel command to its gateway.
    let mut open = close("c-2", "V-1");
    open["action"] = json!("valve_open");
    let (st, v) = h
        .call(Method::POST, "/api/v1/commands", Some(&op_mfa), Some(open))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    sqlx::query(
        "UPDATE commands SET state = 'sent', published_at = now() WHERE command_id = 'c-2'",
    )
    .execute(&h.db.pool)
    .await
    .unwrap();
    let (st, v) = h
        .call(Method::POST, "/api/v1/commands/c-2/cancel", Some(&op), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["outcome"].as_str(),
            v["cancel_command"].as_str(),
            v["state"].as_str()
        ),
        (Some("requested"), Some("c-2.cancel"), Some("sent"))
    );
    // History: state and events, visible to the auditor.
    let (st, v) = h
        .call(
            Method::GET,
            "/api/v1/commands/c-1",
            Some(&token(&[Role::Auditor])),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "cancelled");
    let states: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "cancelled"]);
    let (st, v) = h
        .call(
            Method::GET,
            "/api/v1/meters/V-1/commands",
            Some(&token(&[Role::Billing])),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let ids: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c-2.cancel", "c-2", "c-1"]);
    // Out of scope is not found.
    let other_org = token_with(&[Role::MeterOperator], "org-b", true, 3600, AUD);
    let (st, _) = h
        .call(Method::GET, "/api/v1/commands/c-1", Some(&other_org), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/commands",
            Some(&other_org),
            Some(close("c-9", "V-1")),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Retry: a cancelled command is not retried; a failed valve command is, as a new id, with
    // a second factor.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/commands/c-1/retry",
            Some(&op_mfa),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    sqlx::query("UPDATE commands SET state = 'failed' WHERE command_id = 'b-0'")
        .execute(&h.db.pool)
        .await
        .unwrap();
    let (st, v) = h
        .call(Method::POST, "/api/v1/commands/b-0/retry", Some(&op), None)
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("second_factor_required"))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/commands/b-0/retry",
            Some(&op_mfa),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["command"]["id"].as_str(), v["command"]["parent"].as_str()),
        (Some("b-0-r"), Some("b-0"))
    );
    assert_eq!(v["command"]["attempt"], 1);
    // The library audits under the API caller.
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit_log WHERE actor = 'api:tester' AND entity = 'command' \
         AND action = 'command.cancel' AND entity_id = 'c-1'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(n, 1);
    h.db.drop_database().await;
}

#[tokio::test]
async fn hydrant_permits_create_unlock_inside_window_refuse_outside_and_revoke() {
    let h = start("hydrants").await;
    commandable(&h, "H-1", "hydrant:h1", "org-a").await;
    commandable(&h, "H-2", "hydrant:h2", "org-a").await;
    commandable(&h, "V-1", "cjt188:00000000000021", "org-a").await;
    let op = token(&[Role::MeterOperator]);
    let op_mfa = token_with(&[Role::MeterOperator], "*", true, 3600, AUD);
    // Whole seconds: the permit is compared with its stored (microsecond) window.
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let hour = time::Duration::hours(1);
    let permit = |id: &str, hydrant: &str, from: time::OffsetDateTime, to: time::OffsetDateTime| {
        json!({"id": id, "hydrant": hydrant, "holder": "Street Cleaning Co",
               "valid_from": rfc(from), "valid_to": rfc(to), "volume_limit_m3": "12.5"})
    };
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrant-permits",
            Some(&op),
            Some(permit("p-now", "H-1", now - hour, now + 2 * hour)),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["hydrant"], "hydrant:h1");
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/hydrant-permits",
            Some(&op),
            Some(permit("p-now", "H-1", now - hour, now + 2 * hour)),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrant-permits",
            Some(&op),
            Some(permit("p-now", "H-1", now, now + 3 * hour)),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    let tomorrow = now + time::Duration::days(1);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrant-permits",
            Some(&op),
            Some(permit("p-fut", "H-2", tomorrow, tomorrow + hour)),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    // Bad permits name the field.
    for (body, field) in [
        (permit("p-x", "H-1", now + hour, now), "valid_to"),
        (permit("p-x", "V-1", now, now + hour), "hydrant"),
    ] {
        let (st, v) = h
            .call(
                Method::POST,
                "/api/v1/hydrant-permits",
                Some(&op),
                Some(body),
            )
            .await;
        assert_eq!(
            (st, v["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{v}"
        );
    }
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/hydrant-permits",
            Some(&op),
            Some(permit("p-x", "H-404", now, now + hour)),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Unlock is high-risk.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrants/H-1/unlock",
            Some(&op),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("second_factor_required"))
    );
    // Inside the active permit: an unlock command for the rest of the window; idempotent.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrants/H-1/unlock",
            Some(&op_mfa),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["command"]["id"], "permit:p-now:unlock");
    assert_eq!(v["command"]["action_type"], "hydrant_unlock");
    assert_eq!(v["command"]["cause"]["permit"], "p-now");
    let duration = v["command"]["action"]["duration_s"].as_u64().unwrap();
    assert!((3600..=7200).contains(&duration), "{duration}");
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrants/H-1/unlock",
            Some(&op_mfa),
            Some(json!({"permit": "p-now"})),
        )
        .await;
    assert_eq!(
        (st, v["created"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{v}"
    );
    // Outside its permit's window: refused with the window in the detail.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrants/H-2/unlock",
            Some(&op_mfa),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("outside permit p-fut's window")
            && detail.contains(&tomorrow.date().to_string()),
        "{detail}"
    );
    // Only hydrants unlock.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrants/V-1/unlock",
            Some(&op_mfa),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("hydrant")),
        "{v}"
    );
    // Another hydrant's permit does not unlock this one.
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/hydrants/H-2/unlock",
            Some(&op_mfa),
            Some(json!({"permit": "p-now"})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM commands WHERE device_id = 'hydrant:h2'")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(n, 0);
    // Revoke: once; an unlock under a revoked permit is refused.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrant-permits/p-now/revoke",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["revoked_at"].is_string(), "{v}");
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/hydrant-permits/p-now/revoke",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/hydrants/H-1/unlock",
            Some(&op_mfa),
            Some(json!({"permit": "p-now"})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("revoked"), "{v}");
    // The command is visible in the hydrant's history.
    let (st, v) = h
        .call(
            Method::GET,
            "/api/v1/meters/H-1/commands",
            Some(&token(&[Role::Auditor])),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["items"][0]["id"], "permit:p-now:unlock");
    h.db.drop_database().await;
}
