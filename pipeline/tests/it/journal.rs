//! The ingest journal against real PostgreSQL: rollups and meter state written behind the
//! ingest transaction end up exactly as if they had been written in it, wherever the folds
//! happen, across crashes, edits and out-of-order reads.

use model::{ClockSource, Quality, Quantity, Reading, SourceKind};
use pipeline::db::journal::{self, Pending};
use pipeline::db::{self, StoreOptions, WriteMode, WriteSet};
use pipeline::vee::{Vee, VeeConfig};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use testkit::TestDatabase;
use time::{OffsetDateTime, macros::datetime};

const T0: OffsetDateTime = datetime!(2026-11-20 00:00 UTC);
const PARTITIONS: u16 = 16;
const METERS: [&str; 4] = [
    "cjt188:00000000000001",
    "cjt188:00000000000002",
    "cjt188:00000000000003",
    "cjt188:00000000000004",
];

fn read(meter: &str, hour: i64, value: Decimal) -> Reading {
    testkit::volume_read(meter, T0 + time::Duration::hours(hour), value)
}

/// Register value of meter `i` at `hour`: each meter uses its own steady flow.
fn value(i: usize, hour: i64) -> Decimal {
    dec!(100) + Decimal::from(hour) * Decimal::new(25 * (i as i64 + 1), 3)
}

/// One step of the scenario.
enum Step {
    Reads(Vec<Reading>),
    Edit {
        meter: &'static str,
        hour: i64,
        value: Decimal,
    },
}

fn scenario() -> Vec<Step> {
    let all = |hours: std::ops::Range<i64>| {
        Step::Reads(
            METERS
                .iter()
                .enumerate()
                .flat_map(|(i, m)| hours.clone().map(move |h| read(m, h, value(i, h))))
                .collect(),
        )
    };
    vec![
        all(0..4),
        all(4..6),
        // Meter 1 goes silent until 9 h (estimates for 6, 7, 8 h); the others report 6 h.
        Step::Reads(
            std::iter::once(read(METERS[0], 9, value(0, 9)))
                .chain((1..4).map(|i| read(METERS[i], 6, value(i, 6))))
                .collect(),
        ),
        // A historic read of meter 2 is corrected while its later spans may still be pending.
        Step::Edit {
            meter: METERS[1],
            hour: 2,
            value: value(1, 2) - dec!(0.01),
        },
        // Meter 1's 7 h read arrives late: it supersedes the estimates and its days are
        // recomputed inside the ingest transaction.
        Step::Reads(vec![
            read(METERS[0], 7, value(0, 7) + dec!(0.002)),
            read(METERS[2], 7, value(2, 7)),
        ]),
        // Across the local midnight (16:00 UTC at +08:00).
        all(15..18),
    ]
}

/// The rollup and state tables, as text, for comparison.
async fn tables(db: &TestDatabase) -> Vec<String> {
    let mut out = Vec::new();
    for q in [
        "SELECT meter_id || ' ' || bucket || ' ' || consumption || ' ' || first_value || ' ' || \
         last_value || ' ' || read_count || ' ' || estimated FROM rollup_hourly ORDER BY meter_id, bucket",
        "SELECT meter_id || ' ' || bucket || ' ' || consumption || ' ' || first_value || ' ' || \
         last_value || ' ' || read_count || ' ' || estimated FROM rollup_daily ORDER BY meter_id, bucket",
        "SELECT meter_id || ' ' || last_ts || ' ' || last_value || ' ' || last_received_at || ' ' || \
         coalesce(avg_daily_usage::text, '-') || ' ' || profile::text FROM meter_state ORDER BY meter_id",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(q).fetch_all(&db.pool).await.unwrap();
        out.extend(rows);
    }
    out
}

/// Hourly consumption is derived from `readings` (migration 0151) while `rollup_daily` is
/// folded from the journal's spans (and recomputed after edits): summed per local day (+08:00,
/// the default day offset) the hours must give every daily row exactly.
async fn assert_hourly_sums_to_daily(db: &TestDatabase) {
    let row = "meter_id || ' ' || bucket || ' ' || consumption || ' ' || first_value || ' ' || \
               last_value || ' ' || read_count || ' ' || estimated";
    let daily: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT {row} FROM rollup_daily ORDER BY meter_id, bucket"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let from_hours: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT {row} FROM (
             SELECT meter_id, ((bucket + interval '8 hours') AT TIME ZONE 'UTC')::date AS bucket,
                    sum(consumption) AS consumption,
                    (array_agg(first_value ORDER BY bucket))[1] AS first_value,
                    (array_agg(last_value ORDER BY bucket DESC))[1] AS last_value,
                    sum(read_count) AS read_count, bool_or(estimated) AS estimated
             FROM rollup_hourly GROUP BY 1, 2) h
         ORDER BY meter_id, bucket"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(daily.len() >= 8, "{daily:?}");
    assert_eq!(from_hours, daily);
}

async fn edit(db: &TestDatabase, meter: &str, hour: i64, value: Decimal) {
    pipeline::edit::edit_reading(
        &db.pool,
        meter,
        T0 + time::Duration::hours(hour),
        Quantity::Volume,
        value,
        "ops:test",
        "meter photo",
    )
    .await
    .unwrap();
}

fn now() -> OffsetDateTime {
    T0 + time::Duration::days(3)
}

/// Runs the scenario writing rollups and states in each ingest transaction (the reference).
async fn run_direct(db: &TestDatabase) {
    let mut vee = Vee::new(VeeConfig::default());
    for step in scenario() {
        match step {
            Step::Reads(readings) => {
                testkit::write_validated(&db.pool, &mut vee, readings, now()).await;
            }
            Step::Edit { meter, hour, value } => edit(db, meter, hour, value).await,
        }
    }
}

/// Validates `readings` and writes them as the worker does: readings and a journal record per
/// partition in one transaction; the records go to `pending` once committed.
async fn write_journalled(
    conn: &mut sqlx::PgConnection,
    vee: &mut Vee,
    pending: &mut Pending,
    readings: Vec<Reading>,
) {
    let out = vee.validate(readings, now());
    let entries = journal::split(out.usage, out.states.clone(), Vec::new(), PARTITIONS);
    let stats = db::write_batch(
        conn,
        &WriteSet {
            readings: &out.readings,
            out_of_order: &out.out_of_order,
            mode: WriteMode::Journal(&entries),
            ..WriteSet::default()
        },
        StoreOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(stats.journal_ids.len(), entries.len());
    pending.add(stats.journal_ids.into_iter().zip(entries).collect());
    vee.commit(&out.states);
}

/// Folds everything `pending` holds (with `checkpoint`, states too), as the worker does.
async fn fold(
    conn: &mut sqlx::PgConnection,
    pending: &mut Pending,
    checkpoint: bool,
) -> journal::FlushStats {
    journal::flush(conn, pending, StoreOptions::default(), |_| true, checkpoint)
        .await
        .unwrap()
}

/// What the journal run does after step `i`.
#[derive(Clone, Copy, PartialEq)]
enum After {
    Nothing,
    /// Spans into the rollups; states stay in the journal.
    FoldRollups,
    /// Spans and states, journal records deleted.
    Checkpoint,
    /// The worker dies: its in-memory pending is lost and a new one reads the journal back.
    Crash,
}

/// Runs the scenario through the journal, folding or crashing after the steps `plan` says.
async fn run_journal(db: &TestDatabase, plan: impl Fn(usize) -> After) {
    let mut vee = Vee::new(VeeConfig::default());
    let mut pending = Pending::default();
    let mut conn = db.pool.acquire().await.unwrap();
    let all: Vec<u16> = (0..PARTITIONS).collect();
    for (i, step) in scenario().into_iter().enumerate() {
        match step {
            Step::Reads(readings) => {
                write_journalled(&mut conn, &mut vee, &mut pending, readings).await;
            }
            Step::Edit { meter, hour, value } => edit(db, meter, hour, value).await,
        }
        match plan(i) {
            After::Nothing => {}
            After::FoldRollups => {
                fold(&mut conn, &mut pending, false).await;
                assert_eq!(pending.spans(), 0);
            }
            After::Checkpoint => {
                fold(&mut conn, &mut pending, true).await;
                assert!(pending.is_empty());
            }
            After::Crash => {
                let lost = std::mem::take(&mut pending);
                pending = journal::recover(&mut conn, &all).await.unwrap();
                assert_eq!(pending.spans(), lost.spans(), "every span is read back");
                // The states read back are exactly those the dead worker held.
                let mut back: Vec<_> = pending.states().collect();
                back.sort_by(|a, b| a.0.cmp(b.0));
                let mut held: Vec<_> = lost.states().collect();
                held.sort_by(|a, b| a.0.cmp(b.0));
                assert_eq!(back, held);
                for (m, s) in &back {
                    assert_eq!(vee.state(m), Some(*s));
                }
            }
        }
    }
    fold(&mut conn, &mut pending, true).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM ingest_journal")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "every journal record is folded and deleted");
}

#[tokio::test]
async fn journal_folds_equal_writing_in_the_ingest_transaction() {
    let reference = TestDatabase::create().await;
    run_direct(&reference).await;
    let expected = tables(&reference).await;
    // The scenario really exercises what it claims: estimates, an edit, a superseded estimate.
    let edited: i64 = sqlx::query_scalar("SELECT count(*) FROM readings WHERE quality = 'edited'")
        .fetch_one(&reference.pool)
        .await
        .unwrap();
    assert_eq!(edited, 1);
    let superseded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reading_history WHERE replaced_by = 'actual_read'",
    )
    .fetch_one(&reference.pool)
    .await
    .unwrap();
    assert_eq!(superseded, 1);
    assert!(expected.len() > 40, "{expected:?}");
    assert_hourly_sums_to_daily(&reference).await;
    reference.drop_database().await;

    let steps = scenario().len();
    type Plan = Box<dyn Fn(usize) -> After>;
    let plans: [(&str, Plan); 6] = [
        ("fold only at the end", Box::new(|_| After::Nothing)),
        (
            "checkpoint after every step",
            Box::new(|_| After::Checkpoint),
        ),
        ("rollups after every step", Box::new(|_| After::FoldRollups)),
        (
            "rollups after steps 1 and 3, checkpoint after 2",
            Box::new(|i| match i {
                1 | 3 => After::FoldRollups,
                2 => After::Checkpoint,
                _ => After::Nothing,
            }),
        ),
        (
            "rollups, crash, checkpoint in turn",
            Box::new(|i| match i % 3 {
                0 => After::FoldRollups,
                1 => After::Crash,
                _ => After::Checkpoint,
            }),
        ),
        (
            "rollups then a crash after every step",
            Box::new(move |i| {
                if i % 2 == 0 {
                    After::FoldRollups
                } else if i + 1 < steps {
                    After::Crash
                } else {
                    After::Nothing
                }
            }),
        ),
    ];
    for (name, plan) in plans {
        let db = TestDatabase::create().await;
        run_journal(&db, plan).await;
        assert_eq!(tables(&db).await, expected, "{name}");
        assert_hourly_sums_to_daily(&db).await;
        db.drop_database().await;
    }
}

#[tokio::test]
async fn an_edit_while_spans_are_pending_does_not_count_them_twice() {
    let db = TestDatabase::create().await;
    let mut vee = Vee::new(VeeConfig::default());
    let mut pending = Pending::default();
    let mut conn = db.pool.acquire().await.unwrap();
    let m = METERS[0];
    for (i, hours) in [0..4, 4..8].into_iter().enumerate() {
        let readings: Vec<Reading> = hours.map(|h| read(m, h, value(0, h))).collect();
        write_journalled(&mut conn, &mut vee, &mut pending, readings).await;
        if i == 0 {
            fold(&mut conn, &mut pending, true).await;
        }
    }
    // 4..8 h are pending; the edit recomputes the whole local day from readings.
    edit(&db, m, 2, value(0, 2) + dec!(0.01)).await;
    let daily = || async {
        sqlx::query_as::<_, (String, i32)>(
            "SELECT consumption::text, read_count FROM rollup_daily WHERE meter_id = $1",
        )
        .bind(m)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(daily().await, ("0.175000".into(), 8), "7 spans of 0.025 m3");
    let stats = fold(&mut conn, &mut pending, true).await;
    assert_eq!((stats.spans, stats.skipped), (0, 4));
    assert_eq!(
        daily().await,
        ("0.175000".into(), 8),
        "pending spans not added again"
    );
    let resets: i64 = sqlx::query_scalar("SELECT count(*) FROM rollup_resets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        resets, 0,
        "an applied reset is deleted with the records it covered"
    );
    drop(conn);
    db.drop_database().await;
}

#[tokio::test]
async fn a_manual_read_is_validated_against_the_journalled_state() {
    let db = TestDatabase::create().await;
    let mut vee = Vee::new(VeeConfig::default());
    let mut pending = Pending::default();
    let mut conn = db.pool.acquire().await.unwrap();
    let m = METERS[0];
    let readings: Vec<Reading> = (0..4).map(|h| read(m, h, value(0, h))).collect();
    write_journalled(&mut conn, &mut vee, &mut pending, readings).await;
    let checkpointed: i64 = sqlx::query_scalar("SELECT count(*) FROM meter_state")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(checkpointed, 0, "the state is only in the journal");
    // The next read arrives through the API while the worker has not checkpointed yet: its
    // span starts at the journalled 3 h value, not at nothing.
    let mut manual = read(m, 4, value(0, 4));
    manual.provenance.source = SourceKind::Api;
    manual.clock = ClockSource::Manual;
    let (stored, _) = pipeline::edit::ingest_manual(&db.pool, manual, VeeConfig::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.quality, Quality::Validated);
    fold(&mut conn, &mut pending, false).await;
    let daily: (String, i32) = sqlx::query_as(
        "SELECT consumption::text, read_count FROM rollup_daily WHERE meter_id = $1",
    )
    .bind(m)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(daily, ("0.100000".into(), 5), "4 spans of 0.025 m3");
    db.drop_database().await;
}
