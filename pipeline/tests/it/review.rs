//! The review queue against the real PostgreSQL: items collected once from every source, listed
//! oldest first, assigned, and resolved with the decision applied to the read and audited.

use pipeline::review::{self, Decision, Filter, ItemKind, ReviewError};
use rust_decimal::Decimal;
use testkit::TestDatabase;

const METER: &str = "cjt188:00000000000777";

async fn exec(db: &TestDatabase, sql: &str) {
    sqlx::query(sql).execute(&db.pool).await.unwrap();
}

#[tokio::test]
async fn items_are_collected_once_and_resolved_with_an_audited_decision() {
    let db = TestDatabase::create().await;
    exec(&db, &format!("INSERT INTO meters (meter_id, protocol, meter_book) VALUES ('{METER}', 'cjt188', 'R-1')")).await;
    // Validated reads at 01:00 and 03:00; a late read for 02:00 held as out of order; a read
    // VEE refused as a register decrease.
    exec(
        &db,
        &format!(
            "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, quality_detail, flags, clock, source, received_at) VALUES
             ('{METER}', '2026-10-05 01:00+08', 'volume', 100.0, 'm3', 'validated', NULL, '{{}}', 'meter', 'coap', now()),
             ('{METER}', '2026-10-05 03:00+08', 'volume', 100.4, 'm3', 'validated', NULL, '{{}}', 'meter', 'coap', now()),
             ('{METER}', '2026-10-05 02:00+08', 'volume', 100.2, 'm3', 'actual', NULL, '{{out_of_order}}', 'meter', 'coap', now()),
             ('{METER}', '2026-10-05 04:00+08', 'volume', 90.0, 'm3', 'rejected',
              '{{\"status\": \"rejected\", \"reason\": \"register_decrease\"}}', '{{}}', 'meter', 'coap', now()),
             ('{METER}', '2026-10-05 05:00+08', 'volume', 80.0, 'm3', 'rejected',
              '{{\"status\": \"rejected\", \"reason\": \"register_decrease\"}}', '{{}}', 'meter', 'coap', now()),
             ('{METER}', '2026-10-05 06:00+08', 'volume', 100.8, 'm3', 'validated', NULL, '{{}}', 'meter', 'coap', now())"
        ),
    )
    .await;
    exec(&db, &format!("INSERT INTO ingest_rejects (kind, meter_id, detail) VALUES ('duplicate_conflict', '{METER}', '{{}}')")).await;
    exec(&db, "INSERT INTO billing_cycles (meter_book, period_start, period_end) VALUES ('R-1', '2026-10-01', '2026-11-01')").await;
    exec(
        &db,
        &format!(
            "INSERT INTO bill_runs (cycle_id, actor, finished_at, detail) VALUES (1, 'test', now(),
             '{{\"skipped\": [{{\"meter_id\": \"{METER}\", \"reason\": \"held for review: 12 of 30 reads in the cycle are estimated or edited (limit 0.2)\"}},
                            {{\"meter_id\": \"cjt188:1\", \"reason\": \"no read at the end boundary\"}}]}}')"
        ),
    )
    .await;
    exec(
        &db,
        &format!(
            "INSERT INTO alarms (meter_id, kind, severity, raised_at) VALUES
             ('{METER}', 'magnetic_tamper', 'high', now()), ('{METER}', 'leak', 'medium', now())"
        ),
    )
    .await;

    let first = review::collect(&db.pool).await.unwrap();
    assert_eq!(
        (
            first.out_of_order_reads,
            first.rejected_reads,
            first.ingest_rejects,
            first.bills_held,
            first.field_visits
        ),
        (1, 2, 1, 1, 1),
        "a leak is not a field visit; a meter skipped for a missing read is not held for review"
    );
    assert_eq!(
        review::collect(&db.pool).await.unwrap(),
        review::Collected::default()
    );

    let open = review::list(
        &db.pool,
        &Filter {
            open_only: true,
            ..Filter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(open.len(), 6);
    let id_of = |kind: ItemKind| {
        open.iter()
            .find(|i| i.kind == kind.as_str())
            .unwrap()
            .item_id
    };
    let second_rejected = open
        .iter()
        .filter(|i| i.kind == "rejected_read")
        .nth(1)
        .unwrap()
        .item_id;

    let ooo = id_of(ItemKind::OutOfOrderRead);
    let assigned = review::assign(&db.pool, ooo, "li.wei", "supervisor")
        .await
        .unwrap();
    assert_eq!(assigned.owner.as_deref(), Some("li.wei"));
    let mine = review::list(
        &db.pool,
        &Filter {
            open_only: true,
            owner: Some("li.wei".into()),
            ..Filter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(mine.len(), 1);

    // Accepting the held read makes it billable through the edit path.
    let done = review::resolve(
        &db.pool,
        ooo,
        Decision::Accept,
        "li.wei",
        "late frame after a coverage gap, value plausible",
    )
    .await
    .unwrap();
    assert_eq!(
        (done.status.as_str(), done.resolution.as_deref()),
        ("resolved", Some("accept"))
    );
    let (quality, value): (String, Decimal) = sqlx::query_as(&format!(
        "SELECT quality, value FROM readings WHERE meter_id = '{METER}' AND ts = '2026-10-05 02:00+08'"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((quality.as_str(), value), ("edited", Decimal::new(1002, 1)));
    let again = review::resolve(&db.pool, ooo, Decision::Reject, "li.wei", "changed my mind")
        .await
        .unwrap_err();
    assert!(
        matches!(again, ReviewError::AlreadyResolved { .. }),
        "{again}"
    );

    // A refused read can be corrected, not "rejected" again.
    let rejected = id_of(ItemKind::RejectedRead);
    let err = review::resolve(&db.pool, rejected, Decision::Reject, "li.wei", "x")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "review item {rejected} is a rejected_read: reject does not apply (allowed: accept, edit, estimate, dismiss)"
        )
    );
    review::resolve(
        &db.pool,
        rejected,
        Decision::Edit(Decimal::new(1006, 1)),
        "li.wei",
        "photo of the register: 100.6",
    )
    .await
    .unwrap();
    let (quality, value): (String, Decimal) = sqlx::query_as(&format!(
        "SELECT quality, value FROM readings WHERE meter_id = '{METER}' AND ts = '2026-10-05 04:00+08'"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((quality.as_str(), value), ("edited", Decimal::new(1006, 1)));

    // The other refused read (05:00) has no better value: it is estimated between the edited
    // 04:00 read (100.6) and the 06:00 read (100.8).
    review::resolve(
        &db.pool,
        second_rejected,
        Decision::Estimate,
        "li.wei",
        "meter head swapped, value lost",
    )
    .await
    .unwrap();
    let (quality, value): (String, Decimal) = sqlx::query_as(&format!(
        "SELECT quality, value FROM readings WHERE meter_id = '{METER}' AND ts = '2026-10-05 05:00+08'"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (quality.as_str(), value),
        ("estimated", Decimal::new(1007, 1))
    );

    // Without a note nothing happens; other kinds are dismissed with one.
    let visit = id_of(ItemKind::FieldVisit);
    assert!(matches!(
        review::resolve(&db.pool, visit, Decision::Dismiss, "li.wei", " ").await,
        Err(ReviewError::Unattributed)
    ));
    review::resolve(
        &db.pool,
        visit,
        Decision::Dismiss,
        "li.wei",
        "seal replaced on site",
    )
    .await
    .unwrap();
    assert!(
        review::resolve(
            &db.pool,
            id_of(ItemKind::IngestReject),
            Decision::Accept,
            "li.wei",
            "x"
        )
        .await
        .is_err()
    );

    let open = review::list(
        &db.pool,
        &Filter {
            open_only: true,
            ..Filter::default()
        },
    )
    .await
    .unwrap();
    let kinds: Vec<&str> = open.iter().map(|i| i.kind.as_str()).collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    let audits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE entity = 'review_item'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audits, 5, "one assignment and four resolutions");
    let edits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'reading.edit'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(edits, 2);
    let estimates: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'reading.estimate'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(estimates, 1);
    db.drop_database().await;
}

#[tokio::test]
async fn an_ingest_reject_is_reprocessed_onto_its_topic_through_the_broker() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let db = TestDatabase::create().await;
    let topic = format!(
        "test/review/{}-{}/readings/3",
        std::process::id(),
        time::OffsetDateTime::now_utc().unix_timestamp_nanos() % 1_000_000_007
    );
    // A message of a wire version the worker did not know yet, and a reading-level refusal.
    sqlx::query(
        "INSERT INTO ingest_rejects (kind, topic, detail) VALUES
         ('unknown_version', $1, '{\"payload\": \"{\\\"v\\\":99}\"}'),
         ('value_out_of_range', NULL, '{\"value\": \"1e30\"}')",
    )
    .bind(&topic)
    .execute(&db.pool)
    .await
    .unwrap();
    review::collect(&db.pool).await.unwrap();
    let items = review::list(
        &db.pool,
        &Filter {
            open_only: true,
            ..Filter::default()
        },
    )
    .await
    .unwrap();
    let (message, refusal) = (items[0].item_id, items[1].item_id);

    let broker = pipeline::config::broker_url(&pipeline::config::mqtt_url()).unwrap();
    let (host, port) = (broker.host.clone(), broker.port);
    let (sub, mut events) = AsyncClient::new(
        MqttOptions::new(
            format!("review-sub-{}", std::process::id()),
            host.clone(),
            port,
        ),
        16,
    );
    sub.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let received = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match events.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(tx) = subscribed_tx.take() {
                        tx.send(()).ok();
                    }
                }
                Event::Incoming(Packet::Publish(p)) => return p.payload.to_vec(),
                _ => {}
            }
        }
    });
    tokio::time::timeout(std::time::Duration::from_secs(10), subscribed)
        .await
        .unwrap()
        .unwrap();
    let republisher = review::MqttRepublisher { broker };
    let err = review::reprocess(&db.pool, refusal, &republisher, "li.wei", "x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ReviewError::NothingToReprocess { .. }),
        "{err}"
    );
    let resolved = review::reprocess(
        &db.pool,
        message,
        &republisher,
        "li.wei",
        "workers upgraded to wire v99",
    )
    .await
    .unwrap();
    let payload = tokio::time::timeout(std::time::Duration::from_secs(10), received)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(payload, br#"{"v":99}"#);
    assert_eq!(resolved.resolution.as_deref(), Some("reprocess"));
    db.drop_database().await;
}
