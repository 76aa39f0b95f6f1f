//! Migration 0111: the API call log and the audit log become monthly partitions with every
//! row unchanged, the audit hash chain still verifies and keeps growing, the log stays
//! append-only (TRUNCATE of a partition too), and the scheduler's partition upkeep creates
//! their months ahead, moving rows out of the default partition when their month is created.

use pipeline::scheduler::{PartitionsCreated, ensure_partitions};
use sqlx::PgPool;
use testkit::TestDatabase;
use time::{Duration, OffsetDateTime};

const AUDIT_ROWS: &str = "SELECT ROW(audit_id, at, actor, action, entity, entity_id, detail, \
     chain_seq, prev_hash, row_hash)::text FROM audit_log ORDER BY audit_id";
const CALL_ROWS: &str = "SELECT ROW(call_id, at, caller, request_digest, result, error_code, \
     handler, peer)::text FROM api_call_log ORDER BY call_id";

/// Chain findings recomputed in SQL as `api::audit::verify` does: positions contiguous from 1,
/// each row's hash its fields' digest, each link the row before's hash. Empty when intact.
async fn chain_findings(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT format('seq %s: %s', chain_seq,
                       concat_ws(', ',
                           CASE WHEN chain_seq <> row_number() OVER w THEN 'position' END,
                           CASE WHEN row_hash IS DISTINCT FROM wm_audit_digest(prev_hash, audit_id,
                                at, actor, action, entity, entity_id, detail) THEN 'hash' END,
                           CASE WHEN prev_hash IS DISTINCT FROM
                                     coalesce(lag(row_hash) OVER w, '\\x'::bytea) THEN 'link' END))
         FROM audit_log WINDOW w AS (ORDER BY chain_seq) ORDER BY chain_seq",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .filter(|f: &String| !f.ends_with(": "))
    .collect()
}

async fn partition_of(pool: &PgPool, sql: &str) -> String {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn logs_become_monthly_partitions_with_the_audit_chain_intact() {
    let db = TestDatabase::create_migrated_to(110).await;
    let pool = &db.pool;
    // Rows before 0111: an old month and this one, JSON details, a NULL error code.
    sqlx::raw_sql(
        "INSERT INTO audit_log (at, actor, action, entity, entity_id, detail) VALUES
             ('2024-03-05 10:00+00', 'ops', 'edit', 'reading', 'm1', '{\"reason\": \"fix\"}'),
             (now(), 'api:tester', 'create', 'meter', 'cjt188:1', '{}'),
             (now(), 'billing', 'run', 'bill', '7', '{\"bills\": 3}');
         INSERT INTO api_call_log (at, caller, request_digest, result, error_code, handler, peer)
         VALUES ('2024-03-05 10:00+00', 'u1', 'sha256:aa', 200, NULL, 'readings', '10.0.0.1'),
                (now(), 'u2', 'sha256:bb', 403, 'forbidden', 'bills', NULL);",
    )
    .execute(pool)
    .await
    .unwrap();
    let audit_before: Vec<String> = sqlx::query_scalar(AUDIT_ROWS)
        .fetch_all(pool)
        .await
        .unwrap();
    let calls_before: Vec<String> = sqlx::query_scalar(CALL_ROWS).fetch_all(pool).await.unwrap();
    assert_eq!((audit_before.len(), calls_before.len()), (3, 2));
    assert!(chain_findings(pool).await.is_empty());

    db.migrate_rest().await;

    for table in ["audit_log", "api_call_log"] {
        let kind: String =
            sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE relname = $1")
                .bind(table)
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(kind, "p", "{table} is partitioned");
    }
    let audit_after: Vec<String> = sqlx::query_scalar(AUDIT_ROWS)
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(audit_after, audit_before, "every audit row moved unchanged");
    let calls_after: Vec<String> = sqlx::query_scalar(CALL_ROWS).fetch_all(pool).await.unwrap();
    assert_eq!(
        calls_after, calls_before,
        "every call-log row moved unchanged"
    );
    assert_eq!(chain_findings(pool).await, Vec::<String>::new());
    assert_eq!(
        partition_of(
            pool,
            "SELECT tableoid::regclass::text FROM audit_log WHERE audit_id = 1"
        )
        .await,
        "audit_log_202403"
    );
    assert_eq!(
        partition_of(
            pool,
            "SELECT tableoid::regclass::text FROM api_call_log WHERE call_id = 1"
        )
        .await,
        "api_call_log_202403"
    );

    // New rows: the chain continues from the moved rows, ids continue their sequences.
    sqlx::raw_sql(
        "INSERT INTO audit_log (actor, action, entity, entity_id) VALUES ('ops', 'ack', 'alarm', '9');
         INSERT INTO api_call_log (at, caller, request_digest, result, handler)
         VALUES (now(), 'u3', 'sha256:cc', 200, 'meters');",
    )
    .execute(pool)
    .await
    .unwrap();
    let (id, seq): (i64, i64) =
        sqlx::query_as("SELECT audit_id, chain_seq FROM audit_log WHERE action = 'ack'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((id, seq), (4, 4));
    let call_id: i64 = sqlx::query_scalar("SELECT call_id FROM api_call_log WHERE caller = 'u3'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(call_id, 3);
    let this_month = OffsetDateTime::now_utc();
    assert_eq!(
        partition_of(
            pool,
            "SELECT tableoid::regclass::text FROM audit_log WHERE audit_id = 4"
        )
        .await,
        format!(
            "audit_log_{:04}{:02}",
            this_month.year(),
            u8::from(this_month.month())
        )
    );
    assert_eq!(chain_findings(pool).await, Vec::<String>::new());

    // Still append-only: through the parent and on a partition directly.
    for sql in [
        "UPDATE audit_log SET actor = 'mallory' WHERE audit_id = 2",
        "DELETE FROM audit_log_202403",
        "TRUNCATE audit_log",
        "TRUNCATE audit_log_202403",
        "TRUNCATE audit_log_default",
    ] {
        let err = sqlx::raw_sql(sql)
            .execute(pool)
            .await
            .expect_err("the audit log refuses it");
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }

    // A row dated beyond the prepared months waits in the default partition; the upkeep
    // creates the months ahead of its run (those missing only) and moves it into its month.
    let far = this_month + Duration::days(366);
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, entity, entity_id) VALUES ($1, 'ops', 'plan', 'x', '1')",
    )
    .bind(far)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(
        partition_of(
            pool,
            "SELECT tableoid::regclass::text FROM audit_log WHERE action = 'plan'"
        )
        .await,
        "audit_log_default"
    );
    let created = ensure_partitions(pool, far).await.unwrap();
    // Readings were prepared 12 months ahead by 0080: at most the months past that are new.
    assert_eq!(
        (created.api_call_log, created.audit_log),
        (5, 5),
        "{created:?}"
    );
    let far_part = format!("audit_log_{:04}{:02}", far.year(), u8::from(far.month()));
    assert_eq!(
        partition_of(
            pool,
            "SELECT tableoid::regclass::text FROM audit_log WHERE action = 'plan'"
        )
        .await,
        far_part
    );
    assert_eq!(chain_findings(pool).await, Vec::<String>::new());
    let err = sqlx::raw_sql(&format!("TRUNCATE {far_part}"))
        .execute(pool)
        .await
        .expect_err("a partition created ahead refuses TRUNCATE too");
    assert!(err.to_string().contains("append-only"), "{err}");
    assert_eq!(
        ensure_partitions(pool, far).await.unwrap(),
        PartitionsCreated::default(),
        "a second run creates nothing"
    );
    db.drop_database().await;
}
