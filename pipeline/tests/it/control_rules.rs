//! The command service and control rules against a real PostgreSQL (one fresh database per
//! test): idempotent issue, the pending bound, supersession, ack repetition, telemetry
//! confirmation and `valve_fault`, retries and cancels, the arrears safeguards and the reopen
//! on payment, hydrant permits and unpermitted use. The MQTT side (the real gateway and
//! simulators) is in `tests/tests/it/control.rs`.

use model::{CommandAck, CommandAction, CommandId, CommandState, GatewayId, MeterId};
use pipeline::control::calendar::Calendar;
use pipeline::control::rules::{self, ArrearsPolicy, NoticeKind};
use pipeline::control::{self, AckOutcome, CentralState, ControlError, IssueRequest, hydrant};
use rust_decimal::Decimal;
use sqlx::PgPool;
use testkit::TestDatabase;
use time::OffsetDateTime;
use time::macros::datetime;

const GW: &str = "gw-ctl";

async fn meter(pool: &PgPool, id: &str, valve: bool, protected: bool, auto_close: bool) {
    sqlx::query(
        "INSERT INTO meters (meter_id, protocol, gateway_id, has_valve, protected_customer, \
             auto_close_on_burst) VALUES ($1, 'cjt188', $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(GW)
    .bind(valve)
    .bind(protected)
    .bind(auto_close)
    .execute(pool)
    .await
    .unwrap();
}

fn close(id: &str, device: &str) -> IssueRequest {
    IssueRequest::new(
        id,
        MeterId::new(device).unwrap(),
        CommandAction::ValveClose,
        "user:alice",
        "test",
    )
}

fn ack(id: &str, device: &str, state: CommandState, at: OffsetDateTime) -> CommandAck {
    CommandAck {
        v: 1,
        id: CommandId(id.into()),
        gateway: GatewayId::new(GW).unwrap(),
        device: MeterId::new(device).unwrap(),
        state,
        at,
    }
}

async fn reading(pool: &PgPool, meter: &str, quantity: &str, value: i64, received: OffsetDateTime) {
    sqlx::query(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source, \
             received_at) VALUES ($1, $2, $3, $4, '', 'actual', 'meter', 'coap', $2)",
    )
    .bind(meter)
    .bind(received)
    .bind(quantity)
    .bind(Decimal::from(value))
    .execute(pool)
    .await
    .unwrap();
}

async fn event_count(pool: &PgPool, id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM command_events WHERE command_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn issue_is_idempotent_bounded_and_validated() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m = "cjt188:00000000000001";
    meter(pool, m, true, false, false).await;
    meter(pool, "cjt188:00000000000002", false, false, false).await;
    let first = control::issue(pool, &close("c-1", m)).await.unwrap();
    assert!(first.created);
    assert_eq!(first.command.gateway, GW);
    assert_eq!(first.command.state, CentralState::Queued);
    let again = control::issue(pool, &close("c-1", m)).await.unwrap();
    assert!(!again.created);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM commands")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    // The same id for another action is refused.
    let mut open = close("c-1", m);
    open.action = CommandAction::ValveOpen;
    assert!(matches!(
        control::issue(pool, &open).await,
        Err(ControlError::IdConflict { .. })
    ));
    // No valve, unknown meter, hydrant unlock outside a permit: refused with the reason.
    let e = control::issue(pool, &close("c-x", "cjt188:00000000000002"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no valve"), "{e}");
    let e = control::issue(pool, &close("c-y", "cjt188:99999999999999"))
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::UnknownDevice(_)), "{e}");
    // Pending bound: set-time is not a valve command (no supersession), so 20 of them fill
    // the device: c-1 plus 19, and the 21st is refused.
    let mbus = "mbus:ABC12345678";
    sqlx::query("INSERT INTO meters (meter_id, protocol, gateway_id) VALUES ($1, 'mbus', $2)")
        .bind(mbus)
        .bind(GW)
        .execute(pool)
        .await
        .unwrap();
    for i in 0..20 {
        let mut r = close(&format!("t-{i}"), mbus);
        r.action = CommandAction::SetTime;
        control::issue(pool, &r).await.unwrap();
    }
    let mut r = close("t-20", mbus);
    r.action = CommandAction::SetTime;
    let e = control::issue(pool, &r).await.unwrap_err();
    assert!(
        matches!(e, ControlError::TooManyPending { pending: 20, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("at most 20"), "{e}");
    // Once one is executed, there is room again.
    control::apply_ack(
        pool,
        &ack(
            "t-0",
            mbus,
            CommandState::Acknowledged,
            OffsetDateTime::now_utc(),
        ),
    )
    .await
    .unwrap();
    control::issue(pool, &r).await.unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn supersession_acks_expiry_cancel_and_retry() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m = "cjt188:00000000000003";
    meter(pool, m, true, false, false).await;
    // Unpublished older valve command: withdrawn by the newer one.
    control::issue(pool, &close("old", m)).await.unwrap();
    let mut open = close("new", m);
    open.action = CommandAction::ValveOpen;
    let issued = control::issue(pool, &open).await.unwrap();
    assert_eq!(issued.superseded, vec!["old".to_owned()]);
    let old = control::get(pool, "old").await.unwrap();
    assert_eq!(old.state, CentralState::Cancelled);
    assert_eq!(old.superseded_by.as_deref(), Some("new"));
    // Published older one: marked superseded, the gateway's `cancelled` ack settles it.
    control::mark_published(pool, &["new".to_owned()], OffsetDateTime::now_utc())
        .await
        .unwrap();
    let issued = control::issue(pool, &close("newer", m)).await.unwrap();
    assert_eq!(issued.superseded, vec!["new".to_owned()]);
    assert_eq!(
        control::get(pool, "new").await.unwrap().state,
        CentralState::Queued
    );
    let at = OffsetDateTime::now_utc();
    let out = control::apply_ack(pool, &ack("new", m, CommandState::Cancelled, at))
        .await
        .unwrap();
    assert_eq!(out, AckOutcome::Moved(CentralState::Cancelled));

    // Acks repeat (re-published after every reconnect): one event each.
    let t0 = OffsetDateTime::now_utc();
    let q = ack("newer", m, CommandState::Queued, t0);
    let a = ack(
        "newer",
        m,
        CommandState::Acknowledged,
        t0 + time::Duration::seconds(1),
    );
    assert_eq!(
        control::apply_ack(pool, &q).await.unwrap(),
        AckOutcome::Recorded
    );
    assert_eq!(
        control::apply_ack(pool, &a).await.unwrap(),
        AckOutcome::Moved(CentralState::Acknowledged)
    );
    let before = event_count(pool, "newer").await;
    for _ in 0..3 {
        assert_eq!(
            control::apply_ack(pool, &a).await.unwrap(),
            AckOutcome::Duplicate
        );
        assert_eq!(
            control::apply_ack(pool, &q).await.unwrap(),
            AckOutcome::Duplicate
        );
    }
    assert_eq!(event_count(pool, "newer").await, before);
    // A late `sent` does not move an acknowledged command back.
    let s = ack(
        "newer",
        m,
        CommandState::Sent,
        t0 + time::Duration::milliseconds(500),
    );
    assert_eq!(
        control::apply_ack(pool, &s).await.unwrap(),
        AckOutcome::Recorded
    );
    assert_eq!(
        control::get(pool, "newer").await.unwrap().state,
        CentralState::Acknowledged
    );
    // An ack for a command the centre never issued is ignored.
    assert_eq!(
        control::apply_ack(pool, &ack("foreign", m, CommandState::Sent, t0))
            .await
            .unwrap(),
        AckOutcome::Unknown
    );

    // Expiry by TTL, then a retry as a new id linked to the parent, bounded.
    let mut short = close("short", m);
    short.ttl = time::Duration::seconds(1);
    control::issue(pool, &short).await.unwrap();
    let expired = control::expire_due(pool, OffsetDateTime::now_utc() + time::Duration::seconds(2))
        .await
        .unwrap();
    assert_eq!(expired, vec!["short".to_owned()]);
    let r1 = control::retry(pool, "short", "user:bob").await.unwrap();
    assert_eq!(r1.command.id, "short-r");
    assert_eq!(r1.command.parent.as_deref(), Some("short"));
    assert_eq!(r1.command.attempt, 1);
    assert!(
        !control::retry(pool, "short", "user:bob")
            .await
            .unwrap()
            .created
    );
    let e = control::retry(pool, "short-r", "user:bob")
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::BadState { .. }), "{e}");
    for (id, next) in [("short-r", "short-r-r"), ("short-r-r", "short-r-r-r")] {
        control::apply_ack(
            pool,
            &ack(
                id,
                m,
                CommandState::Failed { reason: "x".into() },
                OffsetDateTime::now_utc(),
            ),
        )
        .await
        .unwrap();
        assert_eq!(
            control::retry(pool, id, "user:bob")
                .await
                .unwrap()
                .command
                .id,
            next
        );
    }
    control::apply_ack(
        pool,
        &ack(
            "short-r-r-r",
            m,
            CommandState::Failed { reason: "x".into() },
            OffsetDateTime::now_utc(),
        ),
    )
    .await
    .unwrap();
    let e = control::retry(pool, "short-r-r-r", "user:bob")
        .await
        .unwrap_err();
    assert!(
        matches!(e, ControlError::RetryLimit { attempt: 3, .. }),
        "{e}"
    );

    // Cancel: unpublished → withdrawn; published → a cancel command to the gateway.
    let mut st = close("st-1", m);
    st.action = CommandAction::ValveOpen;
    control::issue(pool, &st).await.unwrap();
    assert_eq!(
        control::cancel(pool, "st-1", "user:alice").await.unwrap(),
        control::Cancelled::Withdrawn
    );
    control::issue(pool, &close("st-2", m)).await.unwrap();
    control::mark_published(pool, &["st-2".to_owned()], OffsetDateTime::now_utc())
        .await
        .unwrap();
    let c = control::cancel(pool, "st-2", "user:alice").await.unwrap();
    assert_eq!(c, control::Cancelled::Requested("st-2.cancel".into()));
    let cancel = control::get(pool, "st-2.cancel").await.unwrap();
    assert_eq!(
        cancel.action,
        CommandAction::Cancel {
            command: CommandId("st-2".into())
        }
    );
    assert!(control::cancel(pool, "st-1", "user:alice").await.is_err());
    db.drop_database().await;
}

#[tokio::test]
async fn telemetry_confirms_or_raises_valve_fault() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let (good, bad, stuck) = (
        "cjt188:00000000000011",
        "cjt188:00000000000012",
        "cjt188:00000000000013",
    );
    for m in [good, bad, stuck] {
        meter(pool, m, true, false, false).await;
        control::issue(pool, &close(&format!("close-{m}"), m))
            .await
            .unwrap();
    }
    let acked = OffsetDateTime::now_utc() - time::Duration::minutes(10);
    for m in [good, bad, stuck] {
        // A reading from before the ack does not count.
        reading(
            pool,
            m,
            "valve_state",
            0,
            acked - time::Duration::minutes(1),
        )
        .await;
        control::apply_ack(
            pool,
            &ack(&format!("close-{m}"), m, CommandState::Acknowledged, acked),
        )
        .await
        .unwrap();
    }
    assert!(
        control::confirm_by_telemetry(pool)
            .await
            .unwrap()
            .is_empty()
    );
    reading(
        pool,
        good,
        "valve_state",
        1,
        acked + time::Duration::minutes(1),
    )
    .await;
    reading(
        pool,
        bad,
        "valve_state",
        0,
        acked + time::Duration::minutes(1),
    )
    .await;
    reading(
        pool,
        stuck,
        "valve_state",
        3,
        acked + time::Duration::minutes(1),
    )
    .await;
    let mut verdicts = control::confirm_by_telemetry(pool).await.unwrap();
    verdicts.sort_by(|a, b| a.device.cmp(&b.device));
    let states: Vec<(&str, CentralState)> = verdicts
        .iter()
        .map(|v| (v.device.as_str(), v.state))
        .collect();
    assert_eq!(
        states,
        vec![
            (good, CentralState::ConfirmedByTelemetry),
            (bad, CentralState::Failed),
            (stuck, CentralState::Failed)
        ]
    );
    assert!(
        verdicts[1].detail.contains("contradicts"),
        "{}",
        verdicts[1].detail
    );
    assert!(
        verdicts[2].detail.contains("abnormal"),
        "{}",
        verdicts[2].detail
    );
    let faults: Vec<String> = sqlx::query_scalar(
        "SELECT meter_id FROM alarms WHERE kind = 'valve_fault' AND cleared_at IS NULL ORDER BY meter_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(faults, vec![bad.to_owned(), stuck.to_owned()]);
    // Decided once.
    assert!(
        control::confirm_by_telemetry(pool)
            .await
            .unwrap()
            .is_empty()
    );
    let events = control::events(pool, &format!("close-{good}"))
        .await
        .unwrap();
    assert_eq!(events.last().unwrap().state, "confirmed_by_telemetry");
    db.drop_database().await;
}

fn policy(threshold: usize) -> ArrearsPolicy {
    ArrearsPolicy {
        notice_period: time::Duration::days(5),
        bulk_threshold: threshold,
        calendar: Calendar::builtin().unwrap(),
    }
}

async fn arrears(pool: &PgPool, m: &str) {
    sqlx::query(
        "INSERT INTO arrears (meter_id, account_id, amount_overdue, overdue_since, reported_at) \
         VALUES ($1, 'acct', 120.50, '2026-09-01', now())",
    )
    .bind(m)
    .execute(pool)
    .await
    .unwrap();
}

async fn last_decision(pool: &PgPool, m: &str) -> rules::Decision {
    rules::decisions(pool, m)
        .await
        .unwrap()
        .pop()
        .expect("a decision")
}

#[tokio::test]
async fn arrears_safeguards_defer_refuse_close_and_reopen_on_payment() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let (plain, protected, unnoticed, fresh) = (
        "cjt188:00000000000021",
        "cjt188:00000000000022",
        "cjt188:00000000000023",
        "cjt188:00000000000024",
    );
    meter(pool, plain, true, false, false).await;
    meter(pool, protected, true, true, false).await;
    meter(pool, unnoticed, true, false, false).await;
    meter(pool, fresh, true, false, false).await;
    for m in [plain, protected, unnoticed, fresh] {
        arrears(pool, m).await;
    }
    let demand = datetime!(2026-11-02 02:00 UTC);
    let notice = datetime!(2026-11-20 02:00 UTC);
    for m in [plain, protected, fresh] {
        rules::record_notice(pool, m, NoticeKind::PaymentDemand, demand, "user:clerk")
            .await
            .unwrap();
    }
    for m in [plain, protected] {
        rules::record_notice(pool, m, NoticeKind::AdvanceNotice, notice, "user:clerk")
            .await
            .unwrap();
    }
    rules::record_notice(
        pool,
        fresh,
        NoticeKind::AdvanceNotice,
        datetime!(2026-12-12 02:00 UTC),
        "user:clerk",
    )
    .await
    .unwrap();
    let p = policy(20);

    // Night (Tuesday 2026-12-08 22:00 Beijing): deferred, nothing sent.
    let report = rules::arrears_run(pool, &p, datetime!(2026-12-08 14:00 UTC))
        .await
        .unwrap();
    assert!(report.closed.is_empty());
    let d = last_decision(pool, plain).await;
    assert_eq!(d.outcome, "deferred");
    assert!(d.reason.contains("outside working hours"), "{}", d.reason);
    assert_eq!(d.inputs["protected_customer"], false);
    assert!(d.inputs["advance_notice_at"].is_string(), "{}", d.inputs);
    // Protected customer: refused, never closed.
    let d = last_decision(pool, protected).await;
    assert_eq!(d.outcome, "refused");
    assert!(d.reason.contains("protected customer"), "{}", d.reason);
    // No notices: refused with what is missing.
    let d = last_decision(pool, unnoticed).await;
    assert_eq!(d.outcome, "refused");
    assert!(d.reason.contains("payment demand"), "{}", d.reason);
    // Notice period running: deferred until it elapses.
    let d = last_decision(pool, fresh).await;
    assert_eq!(d.outcome, "deferred");
    assert!(
        d.reason.contains("notice period not elapsed"),
        "{}",
        d.reason
    );

    // A Sunday: not a working day (holidays: `arrears_holiday_and_bulk_approval`).
    rules::arrears_run(pool, &p, datetime!(2026-12-13 02:00 UTC))
        .await
        .unwrap();
    let d = last_decision(pool, plain).await;
    assert_eq!(d.outcome, "deferred");
    assert!(d.reason.contains("weekend"), "{}", d.reason);

    // A repeated run with the same verdict stores no new row.
    let before = rules::decisions(pool, plain).await.unwrap().len();
    rules::arrears_run(pool, &p, datetime!(2026-12-13 03:00 UTC))
        .await
        .unwrap();
    assert_eq!(rules::decisions(pool, plain).await.unwrap().len(), before);

    // Working hours on a working day: closed, with the decision and its inputs.
    let report = rules::arrears_run(pool, &p, datetime!(2026-12-14 02:00 UTC))
        .await
        .unwrap();
    assert_eq!(report.closed.len(), 1, "{report:?}");
    let close_id = report.closed[0].clone();
    let cmd = control::get(pool, &close_id).await.unwrap();
    assert_eq!(cmd.device, plain);
    assert_eq!(cmd.action, CommandAction::ValveClose);
    assert_eq!(cmd.priority, i16::from(control::PRIORITY_ARREARS));
    assert_eq!(cmd.cause["rule"], "arrears_close");
    let d = last_decision(pool, plain).await;
    assert_eq!(
        (d.outcome.as_str(), d.command.as_deref()),
        ("issued", Some(close_id.as_str()))
    );
    // Not closed twice.
    let report = rules::arrears_run(pool, &p, datetime!(2026-12-14 03:00 UTC))
        .await
        .unwrap();
    assert!(report.closed.is_empty());

    // Payment clears the arrears: reopened at once, highest priority, at any hour.
    control::apply_ack(
        pool,
        &ack(
            &close_id,
            plain,
            CommandState::Acknowledged,
            OffsetDateTime::now_utc(),
        ),
    )
    .await
    .unwrap();
    sqlx::query("DELETE FROM arrears WHERE meter_id = $1")
        .bind(plain)
        .execute(pool)
        .await
        .unwrap();
    let report = rules::arrears_reopen(pool).await.unwrap();
    assert_eq!(report.reopened.len(), 1);
    let open = control::get(pool, &report.reopened[0]).await.unwrap();
    assert_eq!(open.action, CommandAction::ValveOpen);
    assert_eq!(open.priority, 9);
    assert_eq!(open.cause["close_command"], close_id.as_str());
    assert!(
        rules::arrears_reopen(pool)
            .await
            .unwrap()
            .reopened
            .is_empty()
    );
    db.drop_database().await;
}

#[tokio::test]
async fn arrears_holiday_and_bulk_approval() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let meters: Vec<String> = (0..3).map(|i| format!("cjt188:0000000000003{i}")).collect();
    for m in &meters {
        meter(pool, m, true, false, false).await;
        arrears(pool, m).await;
        rules::record_notice(
            pool,
            m,
            NoticeKind::PaymentDemand,
            datetime!(2026-09-02 02:00 UTC),
            "c",
        )
        .await
        .unwrap();
        rules::record_notice(
            pool,
            m,
            NoticeKind::AdvanceNotice,
            datetime!(2026-09-03 02:00 UTC),
            "c",
        )
        .await
        .unwrap();
    }
    let p = policy(2);
    // Thursday 2026-10-08 is a working day; Monday 2026-10-05 10:00 Beijing is a holiday.
    rules::arrears_run(pool, &p, datetime!(2026-10-05 02:00 UTC))
        .await
        .unwrap();
    let d = last_decision(pool, &meters[0]).await;
    assert_eq!(d.outcome, "deferred");
    assert!(d.reason.contains("public holiday"), "{}", d.reason);
    // Saturday 2026-10-10 is a swapped working day: eligible, but 3 > threshold 2 → held.
    let report = rules::arrears_run(pool, &p, datetime!(2026-10-10 02:00 UTC))
        .await
        .unwrap();
    assert!(report.closed.is_empty());
    for m in &meters {
        let d = last_decision(pool, m).await;
        assert_eq!(d.outcome, "awaiting_approval", "{m}");
        assert_eq!(d.inputs["eligible_unapproved"], 3);
    }
    let approved = rules::approve_arrears(pool, "user:director", None)
        .await
        .unwrap();
    assert_eq!(approved, meters);
    let report = rules::arrears_run(pool, &p, datetime!(2026-10-10 03:00 UTC))
        .await
        .unwrap();
    assert_eq!(report.closed.len(), 3);
    let cmd = control::get(pool, &report.closed[0]).await.unwrap();
    assert_eq!(cmd.approver.as_deref(), Some("user:director"));
    db.drop_database().await;
}

#[tokio::test]
async fn burst_auto_close_follows_registry_policy() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let (auto, manual) = ("cjt188:00000000000041", "cjt188:00000000000042");
    meter(pool, auto, true, false, true).await;
    meter(pool, manual, true, false, false).await;
    for m in [auto, manual] {
        sqlx::query(
            "INSERT INTO alarms (meter_id, kind, severity, raised_at, first_seen, last_seen) \
             VALUES ($1, 'burst', 'critical', now(), now(), now())",
        )
        .bind(m)
        .execute(pool)
        .await
        .unwrap();
    }
    let mut undecided = rules::undecided_bursts(pool).await.unwrap();
    undecided.sort();
    assert_eq!(undecided, vec![auto.to_owned(), manual.to_owned()]);
    let (d, issued) = rules::burst_auto_close(pool, auto).await.unwrap().unwrap();
    assert_eq!(d.outcome, "issued");
    let cmd = issued.unwrap().command;
    assert_eq!(cmd.action, CommandAction::ValveClose);
    assert_eq!(cmd.priority, i16::from(control::PRIORITY_BURST));
    assert!(cmd.cause["alarm_id"].is_i64());
    let (d, issued) = rules::burst_auto_close(pool, manual)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.outcome, "refused");
    assert!(d.reason.contains("auto_close_on_burst"), "{}", d.reason);
    assert!(issued.is_none());
    // Decided once per alarm.
    assert!(rules::burst_auto_close(pool, auto).await.unwrap().is_none());
    assert!(rules::undecided_bursts(pool).await.unwrap().is_empty());
    db.drop_database().await;
}

#[tokio::test]
async fn hydrant_permits_bound_unlocks_locks_and_illegal_use() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let h = "hydrant:h7";
    sqlx::query("INSERT INTO meters (meter_id, protocol, gateway_id) VALUES ($1, 'named', $2)")
        .bind(h)
        .bind(GW)
        .execute(pool)
        .await
        .unwrap();
    let now = OffsetDateTime::now_utc();
    let permit = hydrant::Permit {
        id: "P-1".into(),
        hydrant: h.into(),
        holder: "street cleaning".into(),
        valid_from: now + time::Duration::hours(1),
        valid_to: now + time::Duration::hours(3),
        volume_limit_m3: Some(Decimal::from(20)),
        issued_by: "user:permits".into(),
    };
    assert!(hydrant::create_permit(pool, &permit).await.unwrap());
    assert!(!hydrant::create_permit(pool, &permit).await.unwrap());
    // Before the window: refused. A direct unlock without a permit: refused.
    let e = hydrant::unlock(pool, "P-1", "user:x", now)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("outside permit P-1"), "{e}");
    let direct = IssueRequest::new(
        "u-1",
        MeterId::new(h).unwrap(),
        CommandAction::HydrantUnlock { duration_s: 60 },
        "user:x",
        "t",
    );
    assert!(matches!(
        control::issue(pool, &direct).await,
        Err(ControlError::Permit { .. })
    ));
    // Inside: unlocked for the rest of the window.
    let inside = now + time::Duration::hours(2);
    let issued = hydrant::unlock(pool, "P-1", "user:x", inside)
        .await
        .unwrap();
    assert_eq!(
        issued.command.action,
        CommandAction::HydrantUnlock { duration_s: 3600 }
    );
    // Repeated 90 s later, with less of the window left: the same command, nothing new.
    let again = hydrant::unlock(pool, "P-1", "user:x", inside + time::Duration::seconds(90))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.command.id, issued.command.id);
    assert_eq!(again.command.action, issued.command.action);
    // At the end: locked once.
    assert!(hydrant::lock_ended(pool, inside).await.unwrap().is_empty());
    let locks = hydrant::lock_ended(pool, now + time::Duration::hours(3))
        .await
        .unwrap();
    assert_eq!(locks, vec!["permit:P-1:lock".to_owned()]);
    assert!(
        hydrant::lock_ended(pool, now + time::Duration::hours(4))
            .await
            .unwrap()
            .is_empty()
    );
    // Outlet open with no active permit (now, before the window): illegal use raised.
    let since = now - time::Duration::minutes(5);
    reading(pool, h, "outlet_state", 1, now).await;
    let raised = hydrant::detect_illegal_use(pool, since).await.unwrap();
    assert_eq!(raised.len(), 1);
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM alarms WHERE meter_id = $1 AND kind = 'hydrant_illegal_use' AND cleared_at IS NULL",
    )
    .bind(h)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(open, 1);
    // Open inside the permit's window is legal.
    let h2 = "hydrant:h8";
    let p2 = hydrant::Permit {
        id: "P-2".into(),
        hydrant: h2.into(),
        valid_from: now - time::Duration::hours(1),
        valid_to: now + time::Duration::hours(1),
        ..permit.clone()
    };
    hydrant::create_permit(pool, &p2).await.unwrap();
    reading(pool, h2, "outlet_state", 1, now).await;
    // h7's alarm is already open (the same reading seen again is not a new raise); h8 is
    // inside its permit.
    let raised = hydrant::detect_illegal_use(pool, since).await.unwrap();
    assert!(raised.is_empty(), "{raised:?}");
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM alarms WHERE kind = 'hydrant_illegal_use' AND meter_id = $1",
    )
    .bind(h2)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(n, 0);
    let occurrences: i32 = sqlx::query_scalar(
        "SELECT occurrences FROM alarms WHERE kind = 'hydrant_illegal_use' AND meter_id = $1",
    )
    .bind(h)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(occurrences, 1);
    db.drop_database().await;
}
