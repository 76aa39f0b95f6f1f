//! The ingest path's encoding shortcuts (issue 18, branch h18): meter keys fetched as one
//! aligned array (migration 0150), rows sorted by their integer key with each quality detail
//! kept on its own row.

use model::{EstimationMethod, Quality, RejectReason};
use pipeline::db;
use rust_decimal_macros::dec;
use testkit::TestDatabase;
use time::{OffsetDateTime, macros::datetime};

const T0: OffsetDateTime = datetime!(2026-11-20 00:00 UTC);

async fn keys_of(db: &TestDatabase, ids: &[&str]) -> Vec<Option<i32>> {
    sqlx::query_scalar("SELECT wm_meter_key_list($1)")
        .bind(ids)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn stored_key(db: &TestDatabase, id: &str) -> i32 {
    sqlx::query_scalar("SELECT meter_key FROM meter_keys WHERE meter_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn meter_keys_come_back_in_the_order_asked_and_new_ones_in_id_order() {
    let db = TestDatabase::create().await;
    let first = keys_of(&db, &["m-b", "m-a", "m-b"]).await;
    let (a, b) = (stored_key(&db, "m-a").await, stored_key(&db, "m-b").await);
    // New meters are inserted sorted, so keys follow the ids (the key-ordered COPY relies on it).
    assert!(a < b, "{a} {b}");
    assert_eq!(first, vec![Some(b), Some(a), Some(b)]);
    // Known ones keep their key; only the new one is added.
    let second = keys_of(&db, &["m-c", "m-a"]).await;
    let c = stored_key(&db, "m-c").await;
    assert_eq!(second, vec![Some(c), Some(a)]);
    assert!(c > b);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM meter_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 3);
    db.drop_database().await;
}

#[tokio::test]
async fn quality_details_stay_with_their_rows_when_the_batch_is_sorted() {
    let db = TestDatabase::create().await;
    let read = |meter: &str, minutes: i64, quality: Quality| {
        let mut r = testkit::volume_read(meter, T0 + time::Duration::minutes(minutes), dec!(10));
        r.quality = quality;
        r
    };
    // Given out of key order (meter keys are assigned in id order, so the sort moves rows),
    // with details on rows that move.
    let readings = vec![
        read("m-z", 0, Quality::Validated),
        read(
            "m-y",
            15,
            Quality::Rejected {
                reason: RejectReason::RegisterDecrease,
            },
        ),
        read(
            "m-b",
            30,
            Quality::Estimated {
                method: EstimationMethod::Linear,
            },
        ),
        read("m-a", 0, Quality::Validated),
        read(
            "m-a",
            -15,
            Quality::Rejected {
                reason: RejectReason::PhysicallyImpossible,
            },
        ),
    ];
    let mut conn = db.pool.acquire().await.unwrap();
    let stats = db::write_batch(
        &mut conn,
        &db::WriteSet {
            readings: &readings,
            ..db::WriteSet::default()
        },
        db::StoreOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(stats.inserted, 5);
    assert!(!stats.slow_path);
    let rows: Vec<(String, i64, String, Option<String>)> = sqlx::query_as(
        "SELECT meter_id, extract(epoch FROM ts - $1)::int8 / 60, quality,
                coalesce(quality_detail->>'reason', quality_detail->>'method')
         FROM readings ORDER BY meter_id, ts",
    )
    .bind(T0)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "m-a".into(),
                -15,
                "rejected".into(),
                Some("physically_impossible".into())
            ),
            ("m-a".into(), 0, "validated".into(), None),
            ("m-b".into(), 30, "estimated".into(), Some("linear".into())),
            (
                "m-y".into(),
                15,
                "rejected".into(),
                Some("register_decrease".into())
            ),
            ("m-z".into(), 0, "validated".into(), None),
        ]
    );
    db.drop_database().await;
}
