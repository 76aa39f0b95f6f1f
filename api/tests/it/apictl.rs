//! Issue 22's second part over real HTTP, PostgreSQL and Mosquitto: the second approver
//! (four-eyes) for high-risk actions, the arrears-rule routes (notices, decisions, bulk
//! approval of held closures), TLS inside the server, and the retention job.

use std::time::{Duration, Instant};

use api::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testkit::TestDatabase;
use time::OffsetDateTime;

use crate::common::{self, AUD, DEADLINE, TokenFor};

const SECRET: &[u8] = b"test-hs256-secret-0123456789";

struct Harness {
    db: TestDatabase,
    base: String,
    http: reqwest::Client,
}

fn state(db: &TestDatabase, name: &str) -> api::AppState {
    let publisher = common::publisher(
        "api-test",
        format!("test/api-{name}/{}", std::process::id()),
    );
    common::app_state(db, SECRET, None, publisher)
}

async fn start(name: &str) -> Harness {
    let db = TestDatabase::create().await;
    let base = common::serve(state(&db, name)).await;
    Harness {
        db,
        base,
        http: reqwest::Client::new(),
    }
}

/// A token of `sub` with `roles` in `org`, with or without a second factor.
fn tok(sub: &str, roles: &[Role], org: &str, mfa: bool) -> String {
    let who = TokenFor {
        sub,
        roles,
        org,
        mfa,
    };
    common::sign(SECRET, &who, AUD, 3600)
}

impl Harness {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let (http, base) = (&self.http, &self.base);
        common::request(http, base, (method, path), Some(token), body, headers).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (s, v, _) = self.send(method, path, token, body, &[]).await;
        (s, v)
    }

    /// A registered, active meter with a serving gateway and a valve, in `org`.
    async fn valve_meter(&self, no: &str, id: &str, org: &str) {
        let (st, v) = self
            .call(
                Method::POST,
                "/api/v1/meters",
                &tok("registrar", &[Role::MeterOperator], "*", false),
                Some(
                    json!({"meter_no": no, "meter_id": id, "org": org, "area": "north",
                        "address": "1 River Road", "customer_account": format!("acct-{no}"),
                        "customer_class": "flat"}),
                ),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        sqlx::query(
            "UPDATE meters SET status = 'active', gateway_id = 'gw-1', has_valve = true WHERE meter_id = $1",
        )
        .bind(id)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    async fn audit_actions(&self, approval: i64) -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT actor, action FROM audit_log WHERE entity = 'api_approval' AND entity_id = $1
             ORDER BY audit_id",
        )
        .bind(approval.to_string())
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }
}

fn close(id: &str, dev: &str) -> Value {
    json!({"id": id, "device": dev, "action": "valve_close", "reason": "burst main in the street"})
}

const FOUR_EYES: (&str, &str) = ("x-second-approver", "request");

#[tokio::test]
async fn a_second_approver_stands_in_for_the_second_factor() {
    let h = start("four-eyes").await;
    h.valve_meter("V-1", "cjt188:00000000000021", "org-a").await;
    h.valve_meter("V-2", "cjt188:00000000000022", "org-a").await;
    let alice = tok("alice", &[Role::MeterOperator], "org-a", false);
    let bob_operator = tok("bob", &[Role::MeterOperator], "org-a", false);
    let carol_other_org = tok("carol", &[Role::MeterAdmin], "org-b", false);
    let dave_admin = tok("dave", &[Role::MeterAdmin], "org-a", false);
    let alice_admin = tok("alice", &[Role::MeterAdmin], "*", true);

    // Without the header: refused as before.
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/commands",
            &alice,
            Some(close("c-1", "V-1")),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("second_factor_required"))
    );

    // With it: held (202, Location), nothing issued.
    let (st, held, headers) = h
        .send(
            Method::POST,
            "/api/v1/commands",
            &alice,
            Some(close("c-1", "V-1")),
            &[
                FOUR_EYES,
                ("x-approval-reason", "night crew has no OTP device"),
            ],
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{held}");
    let id = held["id"].as_i64().unwrap();
    assert_eq!(
        headers["location"].to_str().unwrap(),
        format!("/api/v1/approvals/{id}")
    );
    assert_eq!(held["state"], "pending");
    assert_eq!(held["action"], "valve_close");
    assert_eq!(held["request"], "POST /api/v1/commands");
    assert_eq!(held["requested_by"], "alice");
    assert_eq!(held["reason"], "night crew has no OTP device");
    assert_eq!(held["body"]["id"], "c-1");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM commands")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "a held request issues nothing");

    // A request that does not need a second factor is not held: the header changes nothing.
    let (st, v, _) = h
        .send(
            Method::GET,
            "/api/v1/meters/V-1",
            &alice,
            None,
            &[FOUR_EYES],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    // Four eyes: not the requester (even with other roles), not a role without approval
    // rights, not someone whose scope does not cover the requester's.
    let path = format!("/api/v1/approvals/{id}/approve");
    let (st, v) = h.call(Method::POST, &path, &alice_admin, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("four eyes"), "{v}");
    let (st, v) = h.call(Method::POST, &path, &bob_operator, None).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "{v}"
    );
    assert!(v["detail"].as_str().unwrap().contains("meter_admin"), "{v}");
    let (st, _) = h.call(Method::POST, &path, &carol_other_org, None).await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "another org's request does not exist for carol"
    );
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM commands")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "refused approvals execute nothing");

    // The pending list shows it to the approver.
    let (st, list) = h
        .call(
            Method::GET,
            "/api/v1/approvals?state=pending",
            &dave_admin,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{list}");
    let ids: Vec<i64> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![id]);
    let (_, other) = h
        .call(Method::GET, "/api/v1/approvals", &carol_other_org, None)
        .await;
    assert_eq!(other["items"].as_array().unwrap().len(), 0);
    let (st, v) = h
        .call(
            Method::GET,
            "/api/v1/approvals?state=maybe",
            &dave_admin,
            None,
        )
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("state"))
    );

    // Dave approves: the command is issued once, as alice, naming dave as approver.
    let (st, done) = h
        .call(
            Method::POST,
            &path,
            &dave_admin,
            Some(json!({"note": "checked with the crew"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{done}");
    assert_eq!(done["state"], "executed", "{done}");
    assert_eq!(done["decided_by"], "dave");
    assert_eq!(done["note"], "checked with the crew");
    assert_eq!(done["result_status"], 201);
    assert_eq!(done["result"]["command"]["id"], "c-1");
    assert_eq!(done["result"]["command"]["issued_by"], "api:alice");
    let (issued_by, approver, cause): (String, Option<String>, Value) =
        sqlx::query_as("SELECT issued_by, approver, cause FROM commands WHERE command_id = 'c-1'")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!(issued_by, "api:alice");
    assert_eq!(approver.as_deref(), Some("api:dave"));
    assert_eq!(cause["approval"], id);
    // Decided once: a second approval is a conflict and issues nothing more.
    let (st, v) = h.call(Method::POST, &path, &dave_admin, None).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("already executed"),
        "{v}"
    );
    assert_eq!(
        h.audit_actions(id).await,
        vec![
            ("api:alice".to_owned(), "approval.request".to_owned()),
            ("api:dave".to_owned(), "approval.approve".to_owned()),
            ("api:dave".to_owned(), "approval.execute".to_owned()),
        ]
    );

    // Rejected: nothing happens.
    let (st, held2, _) = h
        .send(
            Method::POST,
            "/api/v1/commands",
            &alice,
            Some(close("c-2", "V-2")),
            &[FOUR_EYES],
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{held2}");
    let id2 = held2["id"].as_i64().unwrap();
    let (st, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/approvals/{id2}/reject"),
            &dave_admin,
            Some(json!({"note": "wrong meter"})),
        )
        .await;
    assert_eq!(
        (st, v["state"].as_str()),
        (StatusCode::OK, Some("rejected")),
        "{v}"
    );
    let (st, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/approvals/{id2}/approve"),
            &dave_admin,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM commands WHERE command_id = 'c-2'")
        .fetch_one(&h.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // Expired: cannot be approved; retention marks it.
    let (_, held3, _) = h
        .send(
            Method::POST,
            "/api/v1/commands",
            &alice,
            Some(close("c-3", "V-2")),
            &[FOUR_EYES],
        )
        .await;
    let id3 = held3["id"].as_i64().unwrap();
    sqlx::query(
        "UPDATE api_approvals SET expires_at = now() - interval '1 second' WHERE approval_id = $1",
    )
    .bind(id3)
    .execute(&h.db.pool)
    .await
    .unwrap();
    let (st, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/approvals/{id3}"),
            &dave_admin,
            None,
        )
        .await;
    assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("expired")));
    let (st, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/approvals/{id3}/approve"),
            &dave_admin,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert!(v["detail"].as_str().unwrap().contains("expired"), "{v}");

    // The route's checks run again at execution: a meter that lost its gateway meanwhile
    // makes the approved request fail, recorded with its answer.
    let (_, held4, _) = h
        .send(
            Method::POST,
            "/api/v1/commands",
            &alice,
            Some(close("c-4", "V-2")),
            &[FOUR_EYES],
        )
        .await;
    let id4 = held4["id"].as_i64().unwrap();
    sqlx::query("UPDATE meters SET gateway_id = NULL WHERE meter_no = 'V-2'")
        .execute(&h.db.pool)
        .await
        .unwrap();
    let (st, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/approvals/{id4}/approve"),
            &dave_admin,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "failed");
    assert_eq!(v["result_status"], 422);
    assert_eq!(v["result"]["field"], "device");

    // Metrics count the outcomes.
    let text = common::metrics(&h.http, &h.base).await;
    assert!(
        text.contains("api_approvals_total{action=\"valve_close\",outcome=\"requested\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("api_approvals_total{action=\"valve_close\",outcome=\"executed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("api_approvals_total{action=\"valve_close\",outcome=\"failed\"} 1"),
        "{text}"
    );
    h.db.drop_database().await;
}

#[tokio::test]
async fn arrears_notices_decisions_and_bulk_closure_approval() {
    let h = start("arrears").await;
    let meters = [
        ("A-1", "cjt188:00000000000031"),
        ("A-2", "cjt188:00000000000032"),
        ("A-3", "cjt188:00000000000033"),
    ];
    for (no, id) in meters {
        h.valve_meter(no, id, "org-a").await;
    }
    h.valve_meter("B-1", "cjt188:00000000000041", "org-b").await;
    let billing = tok("bill", &[Role::Billing], "org-a", false);
    let billing_mfa = tok("bill", &[Role::Billing], "org-a", true);
    let admin = tok("ada", &[Role::MeterAdmin], "*", false);
    let reader = tok("rita", &[Role::MeterReader], "*", false);
    let billing_b = tok("bea", &[Role::Billing], "org-b", true);
    let records: Vec<Value> = meters
        .iter()
        .map(|(no, _)| json!({"meter": no, "account_id": format!("acct-{no}"), "amount_overdue": "150.00", "overdue_since": "2026-02-01"}))
        .collect();
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/arrears",
            &billing,
            Some(json!({"records": records})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    // Notices: refused input names the field; an unknown or out-of-scope meter is 404.
    let notice = |kind: &str, at: &str| json!({"kind": kind, "sent_at": at});
    let cases = [
        (
            "A-1",
            notice("reminder", "2026-02-10T02:00:00Z"),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("kind"),
        ),
        (
            "A-1",
            notice("payment_demand", "yesterday"),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("sent_at"),
        ),
        (
            "A-1",
            notice("payment_demand", "2099-01-01T00:00:00Z"),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("sent_at"),
        ),
        (
            "NOPE",
            notice("payment_demand", "2026-02-10T02:00:00Z"),
            StatusCode::NOT_FOUND,
            None,
        ),
    ];
    for (m, body, status, field) in cases {
        let (st, v) = h
            .call(
                Method::POST,
                &format!("/api/v1/meters/{m}/arrears-notices"),
                &billing,
                Some(body),
            )
            .await;
        assert_eq!((st, v["field"].as_str()), (status, field), "{v}");
    }
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/meters/B-1/arrears-notices",
            &billing,
            Some(notice("payment_demand", "2026-02-10T02:00:00Z")),
        )
        .await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "org-b's meter is outside org-a's scope"
    );
    let (st, _) = h
        .call(
            Method::POST,
            "/api/v1/meters/A-1/arrears-notices",
            &reader,
            Some(notice("payment_demand", "2026-02-10T02:00:00Z")),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    for (no, _) in meters {
        for (kind, at) in [
            ("payment_demand", "2026-02-10T02:00:00Z"),
            ("advance_notice", "2026-02-20T02:00:00Z"),
        ] {
            let (st, v) = h
                .call(
                    Method::POST,
                    &format!("/api/v1/meters/{no}/arrears-notices"),
                    &billing,
                    Some(notice(kind, at)),
                )
                .await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
            assert_eq!(v["kind"], kind);
            assert_eq!(v["recorded_by"], "api:bill");
        }
    }
    let (st, list) = h
        .call(
            Method::GET,
            "/api/v1/arrears-notices?meter=A-2",
            &billing,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{list}");
    let kinds: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["advance_notice", "payment_demand"]);
    let (_, all) = h
        .call(
            Method::GET,
            "/api/v1/arrears-notices?kind=advance_notice",
            &billing,
            None,
        )
        .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    let (_, none) = h
        .call(Method::GET, "/api/v1/arrears-notices", &billing_b, None)
        .await;
    assert_eq!(
        none["items"].as_array().unwrap().len(),
        0,
        "org-b sees no org-a notices"
    );

    // One run on a working Wednesday at 10:00 local finds three closes above a threshold of zero:
    // every one waits for a person.
    let mut policy = pipeline::control::rules::ArrearsPolicy::default_policy().unwrap();
    // Threshold 0: every unapproved close waits (the rule holds when unapproved > threshold,
    // so with 2 the lone A-3 would close unapproved on the second run).
    policy.bulk_threshold = 0;
    let wednesday = time::macros::datetime!(2026-03-04 02:00 UTC);
    let report = pipeline::control::rules::arrears_run(&h.db.pool, &policy, wednesday)
        .await
        .unwrap();
    assert!(report.closed.is_empty(), "{report:?}");
    let (st, held) = h
        .call(Method::GET, "/api/v1/arrears-closures/held", &billing, None)
        .await;
    assert_eq!(st, StatusCode::OK, "{held}");
    let held_ids: Vec<&str> = held
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["meter"].as_str().unwrap())
        .collect();
    assert_eq!(held_ids, meters.iter().map(|m| m.1).collect::<Vec<_>>());
    assert!(
        held[0]["reason"].as_str().unwrap().contains("threshold 0"),
        "{held}"
    );
    let (_, held_b) = h
        .call(
            Method::GET,
            "/api/v1/arrears-closures/held",
            &billing_b,
            None,
        )
        .await;
    assert_eq!(held_b.as_array().unwrap().len(), 0);

    // Approving closes valves: high-risk (second factor).
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/arrears-closures/approve",
            &billing,
            Some(json!({"meters": ["A-1"]})),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("second_factor_required"))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/arrears-closures/approve",
            &billing_mfa,
            Some(json!({"meters": []})),
        )
        .await;
    assert_eq!(
        (st, v["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("meters"))
    );
    let (st, v) = h
        .call(
            Method::POST,
            "/api/v1/arrears-closures/approve",
            &billing_mfa,
            Some(json!({"meters": ["A-1", "A-2"]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["approved"], json!([meters[0].1, meters[1].1]));
    assert_eq!(v["not_held"], json!([]));
    // Already approved: not held any more.
    let (_, v) = h
        .call(
            Method::POST,
            "/api/v1/arrears-closures/approve",
            &billing_mfa,
            Some(json!({"meters": ["A-1"]})),
        )
        .await;
    assert_eq!(
        (v["approved"].clone(), v["not_held"].clone()),
        (json!([]), json!([meters[0].1]))
    );

    // The next run closes the approved ones, naming the approver; A-3 still waits.
    let report = pipeline::control::rules::arrears_run(
        &h.db.pool,
        &policy,
        wednesday + time::Duration::minutes(5),
    )
    .await
    .unwrap();
    assert_eq!(report.closed.len(), 2, "{report:?}");
    let approvers: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT device_id, approver FROM commands WHERE action->>'type' = 'valve_close' ORDER BY device_id",
    )
    .fetch_all(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(
        approvers,
        vec![
            (meters[0].1.to_owned(), Some("api:bill".to_owned())),
            (meters[1].1.to_owned(), Some("api:bill".to_owned())),
        ]
    );
    let (st, decisions) = h
        .call(
            Method::GET,
            "/api/v1/meters/A-1/control-decisions",
            &billing,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{decisions}");
    let outcomes: Vec<&str> = decisions
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, vec!["awaiting_approval", "approved", "issued"]);
    assert_eq!(decisions[2]["inputs"]["approved_by"], "api:bill");

    // A-3 through the second approver: billing without a second factor asks, a meter admin
    // approves; the decision names both.
    let (st, held, _) = h
        .send(
            Method::POST,
            "/api/v1/arrears-closures/approve",
            &billing,
            Some(json!({})),
            &[FOUR_EYES],
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{held}");
    assert_eq!(held["action"], "valve_close");
    let (st, done) = h
        .call(
            Method::POST,
            &format!("/api/v1/approvals/{}/approve", held["id"]),
            &admin,
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{done}");
    assert_eq!(done["state"], "executed", "{done}");
    assert_eq!(done["result"]["approved"], json!([meters[2].1]));
    let (approver,): (Value,) = sqlx::query_as(
        "SELECT inputs->'approver' FROM control_decisions WHERE meter_id = $1 AND outcome = 'approved'",
    )
    .bind(meters[2].1)
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(
        approver,
        json!(format!("api:bill with api:ada (approval {})", held["id"]))
    );
    h.db.drop_database().await;
}

/// A self-signed certificate for localhost/127.0.0.1 made by the openssl command now.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl command (package openssl) generates the test certificate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

#[tokio::test]
async fn tls_serves_https_with_a_self_signed_certificate() {
    use axum::serve::ListenerExt as _;
    let db = TestDatabase::create().await;
    let dir = std::env::temp_dir().join(format!(
        "api-tls-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = self_signed(&dir);
    // A key that is not PKCS#8 PEM is refused with a message saying what is expected.
    let err =
        api::tls::acceptor_from_pem(&std::fs::read(&cert).unwrap(), b"not a key").unwrap_err();
    assert!(err.to_string().contains("PKCS#8"), "{err}");
    let missing = api::tls::acceptor_from_files(&dir.join("nope.pem"), &key).unwrap_err();
    assert!(missing.to_string().contains("nope.pem"), "{missing}");

    let acceptor = api::tls::acceptor_from_files(&cert, &key).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = api::tls::TlsListener::new(tcp, acceptor)
        .unwrap()
        .tap_io(|_| ());
    let state = state(&db, "tls");
    tokio::spawn(async move {
        axum::serve(
            listener,
            api::app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let pem = std::fs::read(&cert).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", addr.port());
    // A client that stalls in the handshake does not block others.
    let _stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let resp = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t = tok("tls-user", &[Role::MeterOperator], "*", false);
    let resp = client
        .get(format!("{base}/api/v1/meters"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Plain HTTP to the TLS port gets no HTTP answer; an untrusting client refuses the server.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", addr.port()))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    let untrusting = reqwest::Client::new()
        .get(format!("{base}/healthz"))
        .send()
        .await;
    assert!(untrusting.is_err(), "{untrusting:?}");
    // The call log has the peer address through the TLS listener.
    let t0 = Instant::now();
    loop {
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT caller, peer FROM api_call_log WHERE handler = '/api/v1/meters' LIMIT 1",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some(r) = row {
            assert_eq!(r, ("tls-user".to_owned(), Some("127.0.0.1".to_owned())));
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "the call was never logged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::remove_dir_all(&dir).ok();
    db.drop_database().await;
}

#[tokio::test]
async fn retention_deletes_by_age_and_dry_runs_count() {
    use pipeline::api_retention::{RetentionPolicy, run};
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let now = OffsetDateTime::now_utc();
    for days in [1, 10, 200, 400] {
        sqlx::query(
            "INSERT INTO api_call_log (at, caller, request_digest, result, handler)
             VALUES ($1, 'c', 'd', 200, '/api/v1/meters')",
        )
        .bind(now - time::Duration::days(days))
        .execute(pool)
        .await
        .unwrap();
    }
    for (key, days, status) in [
        ("new", 1, Some(202_i16)),
        ("old", 8, Some(202)),
        ("stuck", 8, None),
    ] {
        sqlx::query(
            "INSERT INTO api_idempotency (client_id, key, request_hash, status, created_at)
             VALUES ('cl', $1, 'h', $2, $3)",
        )
        .bind(key)
        .bind(status)
        .bind(now - time::Duration::days(days))
        .execute(pool)
        .await
        .unwrap();
    }
    for (nonce, secs) in [("gone", -10_i64), ("live", 300)] {
        sqlx::query("INSERT INTO api_nonces (client_id, nonce, expires_at) VALUES ('cl', $1, $2)")
            .bind(nonce)
            .bind(now + time::Duration::seconds(secs))
            .execute(pool)
            .await
            .unwrap();
    }
    // One pending past its deadline, one decided long ago, one pending and fresh.
    for (state, created_days, expires_days, decided_days) in [
        ("pending", 2, -1, None),
        ("rejected", 400, 399, Some(399)),
        ("pending", 0, 1, None),
    ] {
        sqlx::query(
            "INSERT INTO api_approvals (action, method, target, body, requested_by, requester_roles,
                 state, created_at, expires_at, decided_by, decided_at)
             VALUES ('valve_close', 'POST', '/api/v1/commands', '\\x7b7d', 'alice', '{meter_operator}',
                 $1, $2, $3, $4, $5)",
        )
        .bind(state)
        .bind(now - time::Duration::days(created_days))
        .bind(now + time::Duration::days(expires_days))
        .bind(decided_days.map(|_| "dave"))
        .bind(decided_days.map(|d| now - time::Duration::days(d)))
        .execute(pool)
        .await
        .unwrap();
    }
    let policy = RetentionPolicy::default();
    let dry = run(pool, now, policy, true).await.unwrap();
    let expected = |dry_run| pipeline::api_retention::RetentionReport {
        dry_run,
        call_log: 2,
        idempotency: 1,
        nonces: 1,
        approvals_expired: 1,
        approvals: 1,
    };
    assert_eq!(dry, expected(true));
    let count = |table: &'static str| async move {
        let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await
            .unwrap();
        n
    };
    assert_eq!(count("api_call_log").await, 4, "a dry run deletes nothing");
    assert_eq!(
        run(pool, now, policy, false).await.unwrap(),
        expected(false)
    );
    assert_eq!(count("api_call_log").await, 2);
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM api_idempotency ORDER BY key")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(
        keys,
        vec!["new", "stuck"],
        "a key still in progress is kept"
    );
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM api_approvals ORDER BY approval_id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(states, vec!["expired", "pending"]);
    let again = run(pool, now, policy, false).await.unwrap();
    assert_eq!(
        (
            again.call_log,
            again.idempotency,
            again.nonces,
            again.approvals_expired,
            again.approvals
        ),
        (0, 0, 0, 0, 0)
    );

    // The scheduler's job: runs once per due time and records what it did.
    sqlx::query(
        "INSERT INTO api_call_log (at, caller, request_digest, result, handler)
         VALUES (now() - interval '300 days', 'c', 'd', 200, '/x')",
    )
    .execute(pool)
    .await
    .unwrap();
    let mut s = pipeline::scheduler::Scheduler::new(pool.clone(), "node-a", time::UtcOffset::UTC);
    s.register(pipeline::scheduler::api_retention_job(
        pipeline::scheduler::Schedule::parse("every 1m").unwrap(),
        policy,
        false,
    ));
    let t = OffsetDateTime::now_utc();
    assert!(
        s.tick(t).await.unwrap().is_empty(),
        "nothing due at first sighting"
    );
    let ran = s.tick(t + time::Duration::minutes(2)).await.unwrap();
    assert_eq!(ran.len(), 1);
    assert!(ran[0].succeeded);
    let (detail,): (Value,) =
        sqlx::query_as("SELECT detail FROM job_runs WHERE job = 'api-retention'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(detail["call_log"], 1, "{detail}");
    assert_eq!(detail["dry_run"], false);
    db.drop_database().await;
}
