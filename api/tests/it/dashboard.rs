//! The dashboard's server side over real HTTP and PostgreSQL (issue 23): logins with argon2
//! hashes, TOTP and the failure limit; the read endpoints on known rows; the live event
//! stream fed by LISTEN/NOTIFY; the embedded pages with their content types and CSP.

use std::time::{Duration, Instant};

use api::auth::Role;
use api::users::{NewUser, totp_at, upsert_user};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testkit::TestDatabase;

use crate::common::{self, AUD, DEADLINE, ISS, TokenFor};

const SECRET: &[u8] = b"test-hs256-secret-dashboard-0123";
/// "12345678901234567890" in base32 (the RFC 6238 test key).
const TOTP_B32: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

struct Harness {
    db: TestDatabase,
    base: String,
    http: reqwest::Client,
}

async fn start() -> Harness {
    let db = TestDatabase::create().await;
    let publisher = common::publisher(
        "api-dash",
        format!("test/api-dash/{:08x}", rand::random::<u32>()),
    );
    let base = common::serve(common::app_state(&db, SECRET, None, publisher)).await;
    Harness {
        db,
        base,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
    }
}

fn token(role: Role, org: &str) -> String {
    let who = TokenFor {
        sub: "tester",
        roles: &[role],
        org,
        mfa: false,
    };
    common::sign(SECRET, &who, AUD, 3600)
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

    async fn get(&self, path: &str, tok: &str) -> Value {
        let (st, v) = self.call(Method::GET, path, Some(tok), None).await;
        assert_eq!(st, StatusCode::OK, "GET {path}: {v}");
        v
    }

    async fn login(&self, user: &str, password: &str, otp: Option<&str>) -> (StatusCode, Value) {
        let mut body = json!({"username": user, "password": password});
        if let Some(o) = otp {
            body["otp"] = json!(o);
        }
        self.call(Method::POST, "/api/v1/auth/login", None, Some(body))
            .await
    }

    async fn sql(&self, q: &str) {
        sqlx::raw_sql(q)
            .execute(&self.db.pool)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
    }
}

fn user(name: &str, role: Role, totp: Option<&str>) -> NewUser {
    NewUser {
        username: name.into(),
        password: format!("pw-{name}-0123"),
        role,
        org: "*".into(),
        areas: Vec::new(),
        totp_secret: totp.map(str::to_owned),
    }
}

fn claims_of(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn login_issues_tokens_counts_failures_and_checks_the_second_factor() {
    let h = start().await;
    upsert_user(&h.db.pool, &user("op", Role::MeterOperator, None))
        .await
        .unwrap();
    upsert_user(&h.db.pool, &user("adm", Role::MeterAdmin, Some(TOTP_B32)))
        .await
        .unwrap();
    // Bad input is refused before anything is stored.
    let short = NewUser {
        password: "short".into(),
        ..user("x", Role::Auditor, None)
    };
    assert!(upsert_user(&h.db.pool, &short).await.is_err());
    let bad_secret = user("y", Role::Auditor, Some("not*base32"));
    assert!(upsert_user(&h.db.pool, &bad_secret).await.is_err());
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE username = 'op'")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");

    // A good login: a token of the user's role that the API accepts.
    let (st, v) = h.login("op", "pw-op-0123", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let tok = v["token"].as_str().unwrap();
    let c = claims_of(tok);
    assert_eq!(c["sub"], "op");
    assert_eq!(c["roles"], json!(["meter_operator"]));
    assert_eq!(c["amr"], json!(["pwd"]));
    assert_eq!(c["iss"], ISS);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        api::routes::login::LOGIN_TTL_S
    );
    let summary = h.get("/api/v1/fleet/summary", tok).await;
    assert_eq!(summary["meters"], 0);

    // Wrong password, unknown user, a code for a user without a second factor: one answer.
    let (st1, wrong) = h.login("op", "pw-op-9999", None).await;
    let (st2, unknown) = h.login("nobody", "pw-op-0123", None).await;
    let (st3, no_factor) = h.login("op", "pw-op-0123", Some("123456")).await;
    for (st, v) in [(st1, &wrong), (st2, &unknown), (st3, &no_factor)] {
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(v["code"], "bad_credentials");
    }
    assert_eq!(wrong["detail"], unknown["detail"]);
    // A name no user can have (NUL) is a field error, not a database error.
    let (st, v) = h.login("op\u{0}", "pw-op-0123", None).await;
    assert_eq!(
        (st, v["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("username"))
    );

    // TOTP: the current code gives amr otp, which passes the second-factor rule (the unlock of
    // an unknown hydrant then answers 404, not 403).
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let key = api::users::base32_decode(TOTP_B32).unwrap();
    let code = format!("{:06}", totp_at(&key, now));
    let (st, v) = h.login("adm", "pw-adm-0123", Some(&code)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["amr"], json!(["pwd", "otp"]));
    let mfa = v["token"].as_str().unwrap().to_owned();
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/hydrants/H-404/unlock",
            Some(&mfa),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, v) = h.login("adm", "pw-adm-0123", None).await;
    assert_eq!(v["amr"], json!(["pwd"]));
    let (st, p) = h
        .call(
            Method::POST,
            "/api/v1/hydrants/H-404/unlock",
            Some(v["token"].as_str().unwrap()),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(p["code"], "second_factor_required");
    let stale = format!("{:06}", totp_at(&key, now - 300));
    let (st, _) = h.login("adm", "pw-adm-0123", Some(&stale)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // A disabled user cannot log in.
    h.sql("UPDATE users SET disabled = true WHERE username = 'adm'")
        .await;
    let (st, _) = h.login("adm", "pw-adm-0123", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // The limit: after 5 failures of a name within 15 minutes even the right password is
    // refused with 429 (the count is in PostgreSQL, shared by every node).
    upsert_user(&h.db.pool, &user("victim", Role::Auditor, None))
        .await
        .unwrap();
    for _ in 0..5 {
        let (st, _) = h.login("victim", "guess-guess", None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
    let (st, v) = h.login("victim", "pw-victim-0123", None).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["code"], "too_many_requests");

    // Audited: successes with their amr, failures with the reason (never sent to the caller).
    let rows: Vec<(String, String, Value)> = sqlx::query_as(
        "SELECT action, entity_id, detail FROM audit_log WHERE entity = 'user' ORDER BY audit_id",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    let ok: Vec<_> = rows.iter().filter(|r| r.0 == "auth.login").collect();
    assert_eq!(ok.len(), 3, "{rows:?}");
    assert_eq!(ok[1].2["amr"], json!(["pwd", "otp"]));
    let reasons: Vec<&str> = rows
        .iter()
        .filter(|r| r.0 == "auth.login_failed")
        .map(|r| r.2["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        &reasons[..5],
        [
            "bad_password",
            "unknown_user",
            "no_second_factor",
            "bad_otp",
            "disabled"
        ]
    );
    assert_eq!(reasons.len(), 10);
    h.db.drop_database().await;
}

/// A small fleet written straight into the tables the pipeline owns.
async fn seed(h: &Harness) {
    h.sql(
        "INSERT INTO meters (meter_id, meter_no, protocol, status, org, area, dma, role, gateway_id, meter_book, latitude, longitude) VALUES
         ('cjt188:1', 'A-1', 'cjt188', 'active', 'org-a', 'n', 'DMA-1', 'customer', 'gw-1', 'B1', NULL, NULL),
         ('cjt188:2', 'A-2', 'cjt188', 'active', 'org-a', 'n', 'DMA-1', 'customer', 'gw-1', 'B1', NULL, NULL),
         ('mbus:3', 'A-3', 'mbus', 'faulty', 'org-a', 'n', 'DMA-1', 'customer', 'gw-1', 'B1', NULL, NULL),
         ('mbus:4', 'B-4', 'mbus', 'active', 'org-b', 's', 'DMA-2', 'customer', 'gw-2', 'B2', NULL, NULL),
         ('modbus:in-1', 'IN-1', 'modbus', 'active', 'org-a', 'n', 'DMA-1', 'inlet', 'gw-1', NULL, NULL, NULL),
         ('hydrant:h1', 'H-1', 'hydrant', 'active', 'org-a', 'n', NULL, 'hydrant', 'gw-1', NULL, 24.9, 118.6)",
    )
    .await;
    // Heard: 1 now, 2 two days ago, 3 never; 4 (org-b) an hour ago.
    h.sql(
        "INSERT INTO meter_state (meter_id, last_received_at) VALUES
         ('cjt188:1', now() - interval '10 minutes'), ('cjt188:2', now() - interval '50 hours'),
         ('mbus:4', now() - interval '3 hours'), ('modbus:in-1', now() - interval '5 minutes')",
    )
    .await;
    h.sql(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source, received_at) VALUES
         ('cjt188:1', now() - interval '1 hour', 'signal_rsrp', -95, 'dBm', 'validated', 'meter', 'test', now()),
         ('cjt188:2', now() - interval '1 hour', 'signal_rsrp', -115, 'dBm', 'validated', 'meter', 'test', now()),
         ('hydrant:h1', now() - interval '2 minutes', 'outlet_state', 1, '', 'validated', 'meter', 'test', now()),
         ('hydrant:h1', now() - interval '3 minutes', 'pressure', 3.25, 'bar', 'validated', 'meter', 'test', now())",
    )
    .await;
    h.sql(
        "INSERT INTO gateways (gateway_id, online, last_seen, firmware, spool_depth, uplink_lag_s, health_at) VALUES
         ('gw-1', true, now(), '1.2.3', 42, 1.5, now()), ('gw-2', false, now() - interval '1 hour', '1.2.0', NULL, NULL, NULL)",
    )
    .await;
    // DMA-1 yesterday: inflow 10, customers 6 actual + 1 estimated → loss 30 %.
    h.sql(
        "INSERT INTO rollup_daily (meter_id, bucket, consumption, first_value, last_value, read_count, estimated) VALUES
         ('modbus:in-1', current_date - 1, 10, 0, 10, 24, false),
         ('cjt188:1', current_date - 1, 4, 0, 4, 24, false),
         ('cjt188:2', current_date - 1, 2, 0, 2, 24, false),
         ('mbus:3', current_date - 1, 1, 0, 1, 1, true)",
    )
    .await;
    h.sql(
        "INSERT INTO alarms (meter_id, kind, severity, raised_at, state) VALUES
         ('cjt188:1', 'leak', 'warning', now(), 'open'), ('mbus:4', 'burst', 'critical', now(), 'open')",
    )
    .await;
    h.sql(
        "INSERT INTO commands (command_id, gateway_id, device_id, action, state, issued_by, issued_at, expires_at, reason) VALUES
         ('c-1', 'gw-1', 'cjt188:1', '{\"type\": \"valve_close\"}', 'queued', 'user:op', now() - interval '2 minutes', now() + interval '1 day', 'arrears'),
         ('c-2', 'gw-1', 'cjt188:2', '{\"type\": \"set_time\"}', 'confirmed', 'user:op', now() - interval '1 minute', now() + interval '1 day', 'clock'),
         ('c-3', 'gw-2', 'mbus:4', '{\"type\": \"valve_open\"}', 'failed', 'user:op', now(), now() + interval '1 day', 'paid')",
    )
    .await;
    h.sql(
        "INSERT INTO hydrant_permits (permit_id, hydrant_id, holder, valid_from, valid_to, issued_by) VALUES
         ('p-1', 'hydrant:h1', 'fire brigade', now() - interval '1 hour', now() + interval '1 hour', 'api:op')",
    )
    .await;
    h.sql(
        "INSERT INTO billing_cycles (cycle_id, meter_book, period_start, period_end) VALUES (7, 'B1', '2026-10-01', '2026-11-01');
         INSERT INTO bill_runs (cycle_id, actor, created, skipped) VALUES (7, 'api:bill', 1, 1)",
    )
    .await;
}

fn count(v: &Value, list: &str, key: &str) -> i64 {
    v[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == key)
        .map_or(0, |c| c["count"].as_i64().unwrap())
}

#[tokio::test]
async fn dashboard_reads_summarise_known_rows_within_the_callers_scope() {
    let h = start().await;
    seed(&h).await;
    let op = token(Role::MeterOperator, "*");
    let s = h.get("/api/v1/fleet/summary", &op).await;
    assert_eq!(s["meters"], 6);
    assert_eq!(count(&s, "by_status", "active"), 5);
    assert_eq!(count(&s, "by_status", "faulty"), 1);
    assert_eq!(count(&s, "by_protocol", "cjt188"), 2);
    assert_eq!(count(&s, "by_protocol", "mbus"), 2);
    assert_eq!(count(&s, "comm_health", "ok"), 3);
    assert_eq!(count(&s, "comm_health", "late"), 1);
    assert_eq!(count(&s, "comm_health", "never"), 2);
    assert_eq!(count(&s, "last_seen", "lt_1h"), 2);
    assert_eq!(count(&s, "last_seen", "1h_6h"), 1);
    assert_eq!(count(&s, "last_seen", "1d_3d"), 1);
    assert_eq!(count(&s, "signal", "good"), 1);
    assert_eq!(count(&s, "signal", "poor"), 1);
    assert_eq!(count(&s, "open_alarms", "critical"), 1);
    assert_eq!(count(&s, "gateways", "online"), 1);
    assert_eq!(count(&s, "gateways", "offline"), 1);
    // org-a only: meter 4, its alarm and its gateway are not counted.
    let scoped = token(Role::MeterOperator, "org-a");
    let s = h.get("/api/v1/fleet/summary", &scoped).await;
    assert_eq!(s["meters"], 5);
    assert_eq!(count(&s, "open_alarms", "critical"), 0);
    assert_eq!(count(&s, "open_alarms", "warning"), 1);
    assert_eq!(count(&s, "gateways", "offline"), 0);

    let g = h.get("/api/v1/gateways", &op).await;
    assert_eq!(g[0]["gateway_id"], "gw-1");
    assert_eq!(g[0]["spool_depth"], 42);
    assert_eq!(g[0]["uplink_lag_s"], 1.5);
    assert_eq!(g[0]["meters"], 5);
    assert_eq!(g[1]["online"], false);
    assert_eq!(
        h.get("/api/v1/gateways", &scoped)
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let b = h.get("/api/v1/dma/balance?days=7", &op).await;
    assert_eq!(b[0]["dma"], "DMA-1");
    assert_eq!(b[0]["customer_meters"], 3);
    let day = &b[0]["days"][0];
    assert_eq!(day["inflow"], 10.0);
    assert_eq!(day["metered"], 6.0);
    assert_eq!(day["estimated"], 1.0);
    assert!(
        (day["loss_share"].as_f64().unwrap() - 0.3).abs() < 1e-9,
        "{day}"
    );
    assert_eq!(day["coverage"], 1.0);
    assert_eq!(b[1]["dma"], "DMA-2");
    assert_eq!(b[1]["days"], json!([]));
    let (st, v) = h
        .call(Method::GET, "/api/v1/dma/balance?days=0", Some(&op), None)
        .await;
    assert_eq!(
        (st, v["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("days"))
    );

    let hy = h.get("/api/v1/hydrants", &op).await;
    assert_eq!(hy.as_array().unwrap().len(), 1);
    assert_eq!(hy[0]["meter_id"], "hydrant:h1");
    assert_eq!(hy[0]["outlet"], "open");
    assert_eq!(hy[0]["pressure_bar"], 3.25);
    assert_eq!(hy[0]["latitude"], 24.9);
    assert_eq!(hy[0]["permits"][0]["permit_id"], "p-1");
    assert_eq!(hy[0]["permits"][0]["active"], true);

    let c = h.get("/api/v1/commands", &op).await;
    let ids: Vec<&str> = c["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c-3", "c-2", "c-1"]);
    let c = h.get("/api/v1/commands?state=queued", &op).await;
    assert_eq!(c["items"][0]["id"], "c-1");
    assert_eq!(c["items"][0]["action_type"], "valve_close");
    assert_eq!(c["items"].as_array().unwrap().len(), 1);
    let (st, v) = h
        .call(Method::GET, "/api/v1/commands?state=%00", Some(&op), None)
        .await;
    assert_eq!(
        (st, v["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("state"))
    );
    let c = h.get("/api/v1/commands?action=valve_open", &scoped).await;
    assert_eq!(c["items"], json!([]));

    let r = h.get("/api/v1/bill-runs", &token(Role::Billing, "*")).await;
    let run = &r["items"][0];
    assert_eq!(run["book"], "B1");
    assert_eq!(run["book_meters"], 3);
    assert!(
        (run["progress"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9,
        "{run}"
    );
    assert_eq!(run["finished_at"], Value::Null);
    h.sql("UPDATE bill_runs SET finished_at = now()").await;
    let r = h.get("/api/v1/bill-runs", &token(Role::Billing, "*")).await;
    assert_eq!(r["items"][0]["progress"], 1.0);
    h.db.drop_database().await;
}

/// Reads SSE events (name, data) from a response until `want` arrived or the deadline.
async fn sse_events(
    mut resp: reqwest::Response,
    want: usize,
    within: Duration,
) -> Vec<(String, Value)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let t0 = Instant::now();
    while out.len() < want && t0.elapsed() < within {
        let Ok(next) = tokio::time::timeout(Duration::from_millis(500), resp.chunk()).await else {
            continue;
        };
        let Some(chunk) = next.unwrap() else {
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if !name.is_empty() {
                out.push((name, serde_json::from_str(&data).unwrap_or(Value::Null)));
            }
        }
    }
    out
}

async fn open_stream(h: &Harness, tok: &str) -> reqwest::Response {
    let resp = h
        .http
        .get(format!("{}/api/v1/events?max_s=30", h.base))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    resp
}

#[tokio::test]
async fn the_event_stream_carries_alarm_and_command_changes_to_the_roles_that_may_see_them() {
    let h = start().await;
    seed(&h).await;
    let (st, _) = h.call(Method::GET, "/api/v1/events", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let op = token(Role::MeterOperator, "*");
    let ops = open_stream(&h, &op).await;
    let billing = open_stream(&h, &token(Role::Billing, "*")).await;
    let scoped = open_stream(&h, &token(Role::MeterOperator, "org-b")).await;
    // Give the listeners a moment: the `ready` event is sent after LISTEN.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO alarms (meter_id, kind, severity, raised_at) VALUES ('cjt188:1', 'tamper', 'critical', now()) RETURNING alarm_id",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    let (st, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/alarms/{id}/ack"),
            Some(&op),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    h.sql("UPDATE commands SET state = 'sent' WHERE command_id = 'c-3'")
        .await;
    h.sql("UPDATE gateways SET spool_depth = 7 WHERE gateway_id = 'gw-1'")
        .await;

    let got = sse_events(ops, 5, DEADLINE).await;
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["ready", "alarm", "alarm", "command", "gateway"],
        "{got:?}"
    );
    assert_eq!(got[1].1["id"], id.to_string());
    assert_eq!(got[1].1["state"], "open");
    assert_eq!(got[2].1["state"], "acknowledged");
    assert_eq!(
        got[3].1,
        json!({"kind": "command", "id": "c-3", "meter": "mbus:4", "state": "sent"})
    );
    assert_eq!(got[4].1["id"], "gw-1");
    // Billing may not read alarms: it sees the command and the gateway only.
    let got = sse_events(billing, 3, DEADLINE).await;
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ready", "command", "gateway"], "{got:?}");
    // org-b: the alarm on org-a's meter is not sent; the command on its meter is.
    let got = sse_events(scoped, 3, DEADLINE).await;
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ready", "command", "gateway"], "{got:?}");

    // max_s bounds the stream: it ends by itself.
    let t0 = Instant::now();
    let (st, body) = h
        .call(Method::GET, "/api/v1/events?max_s=1", Some(&op), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(body.as_str().unwrap().contains("event: ready"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let (st, v) = h
        .call(Method::GET, "/api/v1/events?max_s=99999", Some(&op), None)
        .await;
    assert_eq!(
        (st, v["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("max_s"))
    );
    h.db.drop_database().await;
}

#[tokio::test]
async fn the_pages_are_served_with_their_types_and_a_content_security_policy() {
    let h = start().await;
    let r = h.http.get(format!("{}/", h.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/ui/");
    for (path, ctype, needle) in [
        (
            "/ui/",
            "text/html; charset=utf-8",
            "<script type=\"module\" src=\"/ui/app.js\">",
        ),
        (
            "/ui/app.js",
            "text/javascript; charset=utf-8",
            "followEvents",
        ),
        (
            "/ui/vendor/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
            "uPlot",
        ),
        (
            "/ui/vendor/uPlot.min.css",
            "text/css; charset=utf-8",
            ".uplot",
        ),
    ] {
        let r = h
            .http
            .get(format!("{}{path}", h.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["content-type"], ctype, "{path}");
        assert_eq!(
            r.headers()["content-security-policy"],
            api::ui::CSP,
            "{path}"
        );
        assert!(r.text().await.unwrap().contains(needle), "{path}");
    }
    let (st, v) = h.call(Method::GET, "/ui/../Cargo.toml", None, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let (st, v) = h.call(Method::GET, "/ui/nope.js", None, None).await;
    assert_eq!(
        (st, v["code"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    h.db.drop_database().await;
}
