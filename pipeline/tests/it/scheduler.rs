//! The scheduler against the real PostgreSQL: two nodes ticking at once run each due time once,
//! missed due times are caught up, a run left by a dead node is taken over, failures are retried
//! a bounded number of times, and the bill-run job bills a closed cycle only once its reads are
//! complete.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use pipeline::scheduler::{self, BillRunJob, CatchUp, Job, Schedule, Scheduler};
use rust_decimal::Decimal;
use serde_json::json;
use testkit::TestDatabase;
use time::macros::{datetime, offset, time};
use time::{Duration, OffsetDateTime};

/// A job that counts its executions in the database and takes a while, so two nodes overlap.
fn counting_job(name: &str, schedule: Schedule, catch_up: CatchUp, calls: Arc<AtomicUsize>) -> Job {
    Job {
        name: name.into(),
        schedule,
        catch_up,
        run: Arc::new(move |pool, due_at| {
            let calls = Arc::clone(&calls);
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                sqlx::query("INSERT INTO executed (due_at) VALUES ($1)")
                    .bind(due_at)
                    .execute(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(json!({ "ok": true }))
            })
        }),
    }
}

async fn statuses(db: &TestDatabase, job: &str) -> Vec<(OffsetDateTime, String, i32)> {
    sqlx::query_as("SELECT due_at, status, attempt FROM job_runs WHERE job = $1 ORDER BY due_at")
        .bind(job)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn two_nodes_run_each_due_time_once_and_catch_up_what_was_missed() {
    let db = TestDatabase::create().await;
    sqlx::query("CREATE TABLE executed (due_at timestamptz NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let monthly = Schedule::parse("monthly 1 06:00").unwrap();
    let node = |name: &str| {
        let mut s = Scheduler::new(db.pool.clone(), name, offset!(+8));
        s.register(counting_job(
            "close",
            monthly,
            CatchUp::All,
            Arc::clone(&calls),
        ));
        s
    };
    let (a, b) = (node("node-a"), node("node-b"));
    // First sight: nothing is due yet (no back-fill before the job existed).
    let t0 = datetime!(2026-01-15 12:00 +8);
    assert!(a.tick(t0).await.unwrap().is_empty());
    // Both nodes tick at once, three due times later (both were down over two of them).
    let t1 = datetime!(2026-04-01 06:00:05 +8);
    let (ra, rb) = tokio::join!(a.tick(t1), b.tick(t1));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.len() + rb.len(), 3, "{ra:?} {rb:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let executed: Vec<OffsetDateTime> =
        sqlx::query_scalar("SELECT due_at FROM executed ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        executed,
        [
            datetime!(2026-02-01 06:00 +8),
            datetime!(2026-03-01 06:00 +8),
            datetime!(2026-04-01 06:00 +8)
        ]
    );
    assert!(
        statuses(&db, "close")
            .await
            .iter()
            .all(|(_, s, a)| s == "succeeded" && *a == 1)
    );
    // Ticking again changes nothing.
    let (ra, rb) = tokio::join!(a.tick(t1 + Duration::minutes(1)), b.tick(t1));
    assert!(ra.unwrap().is_empty() && rb.unwrap().is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    db.drop_database().await;
}

#[tokio::test]
async fn a_dead_nodes_run_is_taken_over_and_failures_retry_a_bounded_number_of_times() {
    let db = TestDatabase::create().await;
    sqlx::query("CREATE TABLE executed (due_at timestamptz NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut s = Scheduler::new(db.pool.clone(), "node-b", offset!(+8));
    s.register(counting_job(
        "upkeep",
        Schedule::Daily(time!(01:00)),
        CatchUp::Latest,
        Arc::clone(&calls),
    ));
    let failures = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&failures);
    s.register(Job {
        name: "flaky".into(),
        schedule: Schedule::Daily(time!(01:00)),
        catch_up: CatchUp::Latest,
        run: Arc::new(move |_, _| {
            let f = Arc::clone(&f);
            Box::pin(async move {
                f.fetch_add(1, Ordering::SeqCst);
                Err("the mail server said no".to_owned())
            })
        }),
    });
    let t0 = datetime!(2026-03-01 12:00 +8);
    s.tick(t0).await.unwrap();
    // A node died while running the 2 March upkeep: its row says running, nobody holds the lock.
    let due = datetime!(2026-03-02 01:00 +8);
    sqlx::query(
        "INSERT INTO job_runs (job, due_at, node, status, attempt, started_at)
         VALUES ('upkeep', $1, 'node-a', 'running', 1, now())",
    )
    .bind(due)
    .execute(&db.pool)
    .await
    .unwrap();
    // Five days later: the dead run is taken over, the four missed days collapse into the newest.
    let t1 = datetime!(2026-03-06 01:30 +8);
    let ran = s.tick(t1).await.unwrap();
    let upkeep: Vec<_> = ran
        .iter()
        .filter(|o| o.job == "upkeep")
        .map(|o| (o.due_at, o.attempt, o.succeeded))
        .collect();
    assert_eq!(
        upkeep,
        [(due, 2, true), (datetime!(2026-03-06 01:00 +8), 1, true)]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The flaky job: tried once per tick until MAX_ATTEMPTS, then left failed with its error.
    for _ in 0..5 {
        s.tick(t1).await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        scheduler::MAX_ATTEMPTS as usize
    );
    let flaky = statuses(&db, "flaky").await;
    assert_eq!(
        flaky,
        [(
            datetime!(2026-03-06 01:00 +8),
            "failed".to_owned(),
            scheduler::MAX_ATTEMPTS
        )]
    );
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM job_runs WHERE job = 'flaky'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(detail, json!({ "error": "the mail server said no" }));
    db.drop_database().await;
}

#[tokio::test]
async fn the_bill_run_job_waits_for_complete_reads_then_bills_once() {
    let db = TestDatabase::create().await;
    sqlx::query(
        "INSERT INTO meters (meter_id, protocol, meter_book, read_interval_s) VALUES
         ('cjt188:00000000000501', 'cjt188', 'S-1', 86400)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let read = |ts: OffsetDateTime, value: i64| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source, received_at)
                 VALUES ('cjt188:00000000000501', $1, 'volume', $2, 'm3', 'validated', 'meter', 'coap', $1)",
            )
            .bind(ts)
            .bind(Decimal::from(value))
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    // Daily reads for October 2026 except the last ten days.
    for d in 0..21 {
        read(datetime!(2026-09-30 23:00 +8) + Duration::days(d), 1000 + d).await;
    }
    let tariff = format!("{}/../tariffs/nanan-2025.toml", env!("CARGO_MANIFEST_DIR"));
    let tariffs = billing_core::TariffBook::new(vec![
        billing_core::Tariff::parse(&tariff, &std::fs::read_to_string(&tariff).unwrap()).unwrap(),
    ])
    .unwrap();
    let mut s = Scheduler::new(db.pool.clone(), "node-a", offset!(+8));
    s.register(scheduler::bill_run_job(
        Schedule::Daily(time!(06:00)),
        BillRunJob {
            tariffs: Arc::new(tariffs),
            max_missing_share: Decimal::new(5, 2),
            options: pipeline::billing::RunOptions::default(),
            cycles_back: 1,
        },
    ));
    s.tick(datetime!(2026-11-01 12:00 +8)).await.unwrap();
    let ran = s.tick(datetime!(2026-11-02 07:00 +8)).await.unwrap();
    assert_eq!(ran.len(), 1);
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM job_runs WHERE job = 'bill-runs' ORDER BY due_at DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(detail["cycles"][0]["outcome"], "waiting", "{detail}");
    assert_eq!(
        detail["cycles"][0]["because"][0],
        "1 meter(s) without a billable end read: cjt188:00000000000501"
    );
    let bills: i64 = sqlx::query_scalar("SELECT count(*) FROM bills")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(bills, 0);
    // The late reads arrive (a daily NB-IoT meter back in coverage); the next day's run bills.
    for d in 21..32 {
        read(datetime!(2026-09-30 23:00 +8) + Duration::days(d), 1000 + d).await;
    }
    s.tick(datetime!(2026-11-03 07:00 +8)).await.unwrap();
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM job_runs WHERE job = 'bill-runs' ORDER BY due_at DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(detail["cycles"][0]["outcome"], "billed", "{detail}");
    assert_eq!(detail["cycles"][0]["created"], 1);
    // Billed cycles are not looked at again.
    s.tick(datetime!(2026-11-04 07:00 +8)).await.unwrap();
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM job_runs WHERE job = 'bill-runs' ORDER BY due_at DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(detail, json!({ "cycles": [] }));
    let bills: i64 = sqlx::query_scalar("SELECT count(*) FROM bills")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(bills, 1);
    db.drop_database().await;
}

#[tokio::test]
async fn the_arrears_job_evaluates_the_rule_once_per_due_time_with_its_decision_recorded() {
    let db = TestDatabase::create().await;
    sqlx::query(
        "INSERT INTO meters (meter_id, protocol, has_valve) VALUES ('cjt188:00000000000601', 'cjt188', true)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO arrears (meter_id, account_id, amount_overdue, overdue_since, reported_at)
         VALUES ('cjt188:00000000000601', 'acct', 120.50, '2026-09-01', now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let policy = pipeline::control::rules::ArrearsPolicy {
        notice_period: Duration::days(5),
        bulk_threshold: 20,
        calendar: pipeline::control::calendar::Calendar::builtin().unwrap(),
    };
    let node = |name: &str| {
        let mut s = Scheduler::new(db.pool.clone(), name, offset!(+8));
        s.register(scheduler::arrears_job(
            Schedule::parse("every 1h").unwrap(),
            policy.clone(),
        ));
        s
    };
    let (a, b) = (node("node-a"), node("node-b"));
    a.tick(datetime!(2026-11-02 09:30 +8)).await.unwrap();
    let t = datetime!(2026-11-02 10:00:01 +8);
    let (ra, rb) = tokio::join!(a.tick(t), b.tick(t));
    assert_eq!(
        ra.unwrap().len() + rb.unwrap().len(),
        1,
        "one node evaluated the rule"
    );
    // No payment demand or advance notice on record: no close, and the refusal is a decision.
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM job_runs WHERE job = 'arrears-rule'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(detail["closed"], json!([]), "{detail}");
    assert_eq!(detail["decisions"], 1, "{detail}");
    let commands: i64 = sqlx::query_scalar("SELECT count(*) FROM commands")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(commands, 0);
    db.drop_database().await;
}
