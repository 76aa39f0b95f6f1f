//! The meter registry against real PostgreSQL (and Mosquitto for the live worker test):
//! every lifecycle transition, all-or-nothing import, replacement re-validation, live
//! refresh of a running worker.

use std::sync::Arc;
use std::time::Duration;

use model::{BatchEntry, GatewayId, Reading, ReadingBatch, WIRE_VERSION};
use pipeline::ingest::IngestMetrics;
use pipeline::registry::{
    self, Book, Cycle, Op, RegistryError, Replacement, Status, csv, lifecycle,
};
use pipeline::vee::{Vee, VeeConfig};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use testkit::TestDatabase;
use time::OffsetDateTime;

const ACTOR: &str = "test-operator";

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn book(pool: &PgPool, code: &str) {
    registry::save_book(
        pool,
        &Book {
            code: code.into(),
            name: format!("book {code}"),
            reader: Some("reader-1".into()),
            cycle: Cycle::Monthly,
        },
        ACTOR,
    )
    .await
    .unwrap();
}

/// A meter in `status` (imported as a ledger row; `replaced` set directly, as no import or
/// single operation produces it without a successor).
async fn meter_in(pool: &PgPool, no: &str, id: &str, status: Status) {
    let text = format!(
        "meter_no,meter_id,status,meter_book\n{no},{id},{},B1\n",
        if status == Status::Replaced {
            "active"
        } else {
            status.as_str()
        }
    );
    csv::import(pool, &text, ACTOR, false).await.unwrap();
    if status == Status::Replaced {
        sqlx::query("UPDATE meters SET status = 'replaced' WHERE meter_id = $1")
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }
}

async fn run_op(pool: &PgPool, op: Op, no: &str, successor: &str) -> Result<Status, RegistryError> {
    let now = OffsetDateTime::now_utc();
    match op {
        Op::Install => registry::install(pool, no, now, ACTOR).await,
        Op::Activate => registry::activate(pool, no, ACTOR).await,
        Op::MarkFaulty => registry::mark_faulty(pool, no, "display dead", ACTOR).await,
        Op::Retire => registry::retire(pool, no, now, ACTOR).await,
        Op::Replace | Op::ReplaceBySuccessor => registry::replace(
            pool,
            no,
            &Replacement {
                at: now - time::Duration::minutes(1),
                old_final: dec!(12.5),
                new_initial: dec!(0.2),
                successor: (op == Op::ReplaceBySuccessor).then(|| successor.to_owned()),
            },
            ACTOR,
        )
        .await
        .map(|_| lifecycle::next(Status::Active, op).unwrap_or(Status::Active)),
    }
}

#[tokio::test]
async fn every_lifecycle_transition_is_allowed_or_refused_and_audited() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    book(pool, "B1").await;
    let mut n = 0;
    for from in Status::ALL {
        for op in Op::ALL {
            n += 1;
            let no = format!("M{n:03}");
            let id = format!("cjt188:{n:014}");
            let succ_no = format!("S{n:03}");
            meter_in(pool, &no, &id, from).await;
            meter_in(pool, &succ_no, &format!("cjt188:9{n:013}"), Status::InStock).await;
            let audits_before = count(pool, "SELECT count(*) FROM audit_log").await;
            let result = run_op(pool, op, &no, &succ_no).await;
            let stored: String =
                sqlx::query_scalar("SELECT status FROM meters WHERE meter_no = $1")
                    .bind(&no)
                    .fetch_one(pool)
                    .await
                    .unwrap();
            match lifecycle::next(from, op) {
                Some(to) => {
                    assert!(result.is_ok(), "{op} from {from}: {result:?}");
                    assert_eq!(stored, to.as_str(), "{op} from {from}");
                    let audited: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM audit_log WHERE entity = 'meter' AND entity_id = $1
                           AND action = $2 AND actor = $3
                           AND detail->'before'->>'status' = $4 AND detail->'after'->>'status' = $5",
                    )
                    .bind(&no)
                    .bind(format!("registry.{op}"))
                    .bind(ACTOR)
                    .bind(from.as_str())
                    .bind(to.as_str())
                    .fetch_one(pool)
                    .await
                    .unwrap();
                    assert_eq!(audited, 1, "{op} from {from} audited with before/after");
                }
                None => {
                    match result {
                        Err(RegistryError::IllegalTransition { from: f, op: o, .. }) => {
                            assert_eq!((f, o), (from, op));
                        }
                        other => panic!("{op} from {from} should be refused, got {other:?}"),
                    }
                    assert_eq!(stored, from.as_str(), "{op} from {from} changed nothing");
                    assert_eq!(
                        count(pool, "SELECT count(*) FROM audit_log").await,
                        audits_before,
                        "{op} from {from}: a refused operation writes no audit row"
                    );
                }
            }
        }
    }
    // Replacement by a successor: the new meter took over book and status.
    let (status, book): (String, Option<String>) =
        sqlx::query_as("SELECT status, meter_book FROM meters WHERE meter_no = 'S017'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), book.as_deref()), ("active", Some("B1")));
    // Same-id replacements feed meter_replacements.
    let reps = count(
        pool,
        "SELECT count(*) FROM meter_replacements WHERE old_final_value = 12.5",
    )
    .await;
    let allowed = Status::ALL
        .iter()
        .flat_map(|s| [Op::Replace, Op::ReplaceBySuccessor].map(|o| lifecycle::next(*s, o)))
        .filter(Option::is_some)
        .count() as i64;
    assert_eq!(reps, allowed);
    db.drop_database().await;
}

#[tokio::test]
async fn bindings_books_and_models_keep_history_and_rules() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    book(pool, "B1").await;
    book(pool, "B2").await;
    meter_in(pool, "M1", "cjt188:00000000000001", Status::Active).await;
    let t = OffsetDateTime::now_utc() - time::Duration::days(10);
    assert!(
        registry::bind_customer(pool, "M1", "ACC-1", t, ACTOR)
            .await
            .unwrap()
    );
    assert!(
        !registry::bind_customer(pool, "M1", "ACC-1", t, ACTOR)
            .await
            .unwrap()
    );
    assert!(
        registry::bind_customer(pool, "M1", "ACC-2", t + time::Duration::days(1), ACTOR)
            .await
            .unwrap()
    );
    assert!(
        registry::unbind_customer(pool, "M1", t + time::Duration::days(2), ACTOR)
            .await
            .unwrap()
    );
    let history: Vec<(String, bool)> = sqlx::query_as(
        "SELECT account_id, unbound_at IS NOT NULL FROM meter_customer_bindings ORDER BY binding_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        history,
        vec![("ACC-1".into(), true), ("ACC-2".into(), true)]
    );
    registry::move_book(pool, "M1", "B2", ACTOR).await.unwrap();
    assert!(matches!(
        registry::move_book(pool, "M1", "NOPE", ACTOR).await,
        Err(RegistryError::Unknown {
            what: "meter_book",
            ..
        })
    ));
    // A book keeps one cycle length.
    let e = registry::save_book(
        pool,
        &Book {
            code: "B2".into(),
            name: "renamed".into(),
            reader: None,
            cycle: Cycle::Bimonthly,
        },
        ACTOR,
    )
    .await;
    assert!(
        matches!(e, Err(RegistryError::Invalid { field: "cycle", .. })),
        "{e:?}"
    );
    registry::save_model(
        pool,
        &registry::MeterModel {
            code: "LXSY-15E".into(),
            manufacturer: "acme".into(),
            description: "NB-IoT DN15".into(),
            status_bits: vec![(5, "magnetic_tamper".into()), (0, "valve_closed".into())],
        },
        ACTOR,
    )
    .await
    .unwrap();
    assert_eq!(
        registry::status_bits(pool, "LXSY-15E").await.unwrap(),
        vec![(0, "valve_closed".into()), (5, "magnetic_tamper".into())]
    );
    let bad = registry::save_model(
        pool,
        &registry::MeterModel {
            code: "X".into(),
            manufacturer: String::new(),
            description: String::new(),
            status_bits: vec![(16, "leak".into())],
        },
        ACTOR,
    )
    .await;
    assert!(matches!(bad, Err(RegistryError::Invalid { .. })));
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE actor = $1 AND entity_id IN ('M1', 'B2', 'LXSY-15E')
         ORDER BY audit_id",
    )
    .bind(ACTOR)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        actions,
        [
            "registry.save_book",
            "registry.import",
            "registry.bind_customer",
            "registry.bind_customer",
            "registry.unbind_customer",
            "registry.move_book",
            "registry.save_model"
        ]
    );
    db.drop_database().await;
}

const GOOD_CSV: &str = "meter_no,meter_id,status,meter_book,dma,role,customer_account,has_valve,auto_close_on_burst,q3,latitude,longitude,address,installed_at
A-001,cjt188:00000000000101,active,B1,DMA-1,customer,C-1,true,true,2.5,31.230416,121.473701,\"No. 1, Road\",2025-01-01T00:00:00Z
A-002,cjt188:00000000000102,active,B1,DMA-1,customer,C-2,false,false,,,,,
A-003,modbus:dma-1-inlet,active,B1,DMA-1,inlet,,false,false,40,,,,
";

#[tokio::test]
async fn an_import_with_a_bad_row_applies_nothing() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    book(pool, "B1").await;
    // Line 3 names an unknown book, line 4 is malformed: nothing is applied, both reported.
    let bad = GOOD_CSV
        .replace(
            "A-002,cjt188:00000000000102,active,B1",
            "A-002,cjt188:00000000000102,active,B9",
        )
        .replace(
            "A-003,modbus:dma-1-inlet,active,B1,DMA-1,inlet",
            "A-003,modbus:dma-1-inlet,active,B1,DMA-1,boss",
        );
    let err = csv::import(pool, &bad, ACTOR, false).await.unwrap_err();
    let csv::ImportError::Rows(rows) = &err else {
        panic!("{err}")
    };
    let at: Vec<(usize, &str)> = rows.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(at, vec![(4, "role")], "syntax errors first: {rows:?}");
    let bad_book = GOOD_CSV.replace(
        "A-002,cjt188:00000000000102,active,B1",
        "A-002,cjt188:00000000000102,active,B9",
    );
    let err = csv::import(pool, &bad_book, ACTOR, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("line 3: meter_book"), "{err}");
    assert_eq!(count(pool, "SELECT count(*) FROM meters").await, 0);
    assert_eq!(
        count(pool, "SELECT count(*) FROM meter_customer_bindings").await,
        0
    );

    // A dry run reports and writes nothing.
    let dry = csv::import(pool, GOOD_CSV, ACTOR, true).await.unwrap();
    assert_eq!((dry.created, dry.dry_run), (3, true));
    assert_eq!(count(pool, "SELECT count(*) FROM meters").await, 0);
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM audit_log WHERE action = 'registry.import'"
        )
        .await,
        0
    );

    let r = csv::import(pool, GOOD_CSV, ACTOR, false).await.unwrap();
    assert_eq!((r.rows, r.created, r.updated, r.unchanged), (3, 3, 0, 0));
    let (role, dma, q3, account, auto): (String, String, Decimal, String, bool) = sqlx::query_as(
        "SELECT role, dma, nominal_flow_q3, customer_account, auto_close_on_burst FROM meters WHERE meter_no = 'A-001'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        (role.as_str(), dma.as_str(), q3, account.as_str(), auto),
        ("customer", "DMA-1", dec!(2.5), "C-1", true)
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM meters WHERE role = 'inlet' AND protocol = 'modbus'"
        )
        .await,
        1
    );
    // Export, then import the export: nothing changes.
    let exported = csv::export(pool).await.unwrap();
    let again = csv::import(pool, &exported, ACTOR, false).await.unwrap();
    assert_eq!(
        (again.created, again.updated, again.unchanged),
        (0, 0, 3),
        "{exported}"
    );
    // An existing meter's status is not changed by an import.
    let moved = GOOD_CSV.replace(
        "A-002,cjt188:00000000000102,active",
        "A-002,cjt188:00000000000102,retired",
    );
    let err = csv::import(pool, &moved, ACTOR, false).await.unwrap_err();
    assert!(err.to_string().contains("line 3: status"), "{err}");
    db.drop_database().await;
}

fn read(meter: &str, ts: OffsetDateTime, value: Decimal) -> Reading {
    testkit::volume_read(meter, ts, value)
}

#[tokio::test]
async fn a_replacement_revalidates_the_held_reads() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    book(pool, "B1").await;
    let meter = "cjt188:00000000000201";
    meter_in(pool, "R-1", meter, Status::Active).await;
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::hours(10);
    let h = |n: i64| t0 + time::Duration::hours(n);
    let mut vee = Vee::new(VeeConfig::default());
    // Old device: 100.0, 100.4; swapped at h(2) (final 100.5, new starts at 0.3); the new
    // device's reads 0.5 and 0.9 are held as register decreases.
    testkit::write_validated(
        pool,
        &mut vee,
        vec![
            read(meter, h(0), dec!(100.0)),
            read(meter, h(1), dec!(100.4)),
            read(meter, h(3), dec!(0.5)),
            read(meter, h(4), dec!(0.9)),
        ],
        OffsetDateTime::now_utc(),
    )
    .await;
    let held = count(
        pool,
        "SELECT count(*) FROM readings WHERE quality = 'rejected' AND quality_detail->>'reason' = 'register_decrease'",
    )
    .await;
    assert_eq!(held, 2);
    let outcome = registry::replace(
        pool,
        "R-1",
        &Replacement {
            at: h(2),
            old_final: dec!(100.5),
            new_initial: dec!(0.3),
            successor: None,
        },
        ACTOR,
    )
    .await
    .unwrap();
    assert_eq!((outcome.revalidated, outcome.still_rejected), (2, 0));
    let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT quality, flags FROM readings WHERE meter_id = $1 AND ts > $2 ORDER BY ts",
    )
    .bind(meter)
    .bind(h(2))
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("validated".into(), vec!["meter_replaced".into()]),
            ("validated".into(), vec![]),
        ]
    );
    // Usage bridges the swap: (100.5 - 100.4) + (0.5 - 0.3) + (0.9 - 0.5) = 0.7 after h(1).
    let total: Decimal =
        sqlx::query_scalar("SELECT sum(consumption) FROM rollup_hourly WHERE meter_id = $1")
            .bind(meter)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(total, dec!(1.1), "0.4 before the swap + 0.7 after");
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM reading_history WHERE replaced_by = 'revalidation'"
        )
        .await,
        2
    );
    let state: Decimal =
        sqlx::query_scalar("SELECT last_value FROM meter_state WHERE meter_id = $1")
            .bind(meter)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(state, dec!(0.9));
    let audit: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM audit_log WHERE action = 'registry.replace' AND entity_id = 'R-1'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(audit["revalidated"], 2);
    assert_eq!(audit["old_final"], "100.5");
    db.drop_database().await;
}

fn batch(gateway: &str, partition: u16, seq: u64, readings: Vec<Reading>) -> Vec<u8> {
    serde_json::to_vec(&ReadingBatch {
        v: WIRE_VERSION,
        gateway: GatewayId::new(gateway).unwrap(),
        partition,
        sent_at: OffsetDateTime::now_utc(),
        entries: readings
            .into_iter()
            .enumerate()
            .map(|(i, reading)| BatchEntry {
                seq: seq + i as u64,
                reading,
            })
            .collect(),
        incarnation: None,
        prev: None,
    })
    .unwrap()
}

#[tokio::test]
async fn a_running_worker_sees_registry_changes_without_restart() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    book(pool, "B1").await;
    let meter = "cjt188:00000000000301";
    csv::import(
        pool,
        &format!(
            "meter_no,meter_id,status,meter_book,gateway_id\nL-1,{meter},active,B1,gw-expected\n"
        ),
        ACTOR,
        false,
    )
    .await
    .unwrap();
    let root = format!(
        "test/registry/{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let url = pipeline::config::mqtt_url();
    let mut config = pipeline::worker::WorkerConfig::new(&url, &root, 0, 1, 1).unwrap();
    let client_id = format!("wk-reg-{}", rand::random::<u32>());
    config.client_id = client_id.clone();
    let metrics = Arc::new(IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(pipeline::worker::run(
        config,
        db.pool.clone(),
        Arc::clone(&metrics),
        shutdown,
    ));
    let broker = pipeline::config::broker_url(&url).unwrap();
    let (host, port) = (broker.host.clone(), broker.port);
    let (client, mut el) = AsyncClient::new(
        MqttOptions::new(format!("pub-{}", rand::random::<u32>()), host, port),
        64,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::hours(5);
    let h = |n: i64| t0 + time::Duration::hours(n);
    let topic = format!("{root}/readings/0");
    let quality_pool = db.pool.clone();
    let quality_at = |ts: OffsetDateTime| {
        let pool = quality_pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
            "SELECT coalesce(quality_detail->>'reason', quality) FROM readings WHERE meter_id = $1 AND ts = $2",
        )
        .bind(meter)
        .bind(ts)
        .fetch_optional(&pool)
        .await
        .unwrap()
        }
    };
    // Until the worker is subscribed, keep sending the first reads (deduplicated).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while quality_at(h(1)).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker never consumed"
        );
        let payload = batch(
            "gw-1",
            0,
            1,
            vec![read(meter, h(0), dec!(1)), read(meter, h(1), dec!(2))],
        );
        client
            .publish(&topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(quality_at(h(1)).await.as_deref(), Some("validated"));
    // Retire the meter at h(1) + 30 min while the worker runs: its next read is refused.
    let changed = std::time::Instant::now();
    registry::retire(pool, "L-1", h(1) + time::Duration::minutes(30), ACTOR)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            batch("gw-1", 0, 3, vec![read(meter, h(2), dec!(3))]),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let q = loop {
        if let Some(q) = quality_at(h(2)).await {
            break q;
        }
        assert!(tokio::time::Instant::now() < deadline, "read never stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        q, "inactive_meter",
        "the worker saw the retirement without a restart"
    );
    eprintln!("registry change to refused read: {:?}", changed.elapsed());
    // Last frame per meter, and the meter heard through an unexpected gateway.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (gw, unexpected) = loop {
        let row: Option<(String, bool)> = sqlx::query_as(
            "SELECT gateway_id, unexpected FROM meter_last_frame WHERE meter_id = $1",
        )
        .bind(meter)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(r) = row {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no last frame written"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((gw.as_str(), unexpected), ("gw-1", true));
    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
    pipeline::worker::forget_session(&url, &client_id)
        .await
        .unwrap();
    db.drop_database().await;
}
