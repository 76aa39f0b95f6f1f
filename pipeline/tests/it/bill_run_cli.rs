//! `pipeline bill-run` and `pipeline record-arrears`, the built binary against a fresh database
//! on the real PostgreSQL: a cycle run twice creates one bill, bad input exits non-zero with a
//! clear message.

use std::str::FromStr;

use rust_decimal::Decimal;
use sqlx::PgPool;
use testkit::TestDatabase;
use time::OffsetDateTime;
use time::macros::{date, datetime};

const METER: &str = "cjt188:00000000000501";

fn tariff() -> String {
    format!("{}/../tariffs/nanan-2025.toml", env!("CARGO_MANIFEST_DIR"))
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn pipeline(db: &TestDatabase, args: &[&str]) -> Out {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        // Info logs on: they go to stderr and must not disturb stdout (`--json`).
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .await
        .expect("run the pipeline binary");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn read(pool: &PgPool, ts: OffsetDateTime, value: &str) {
    sqlx::query(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source, received_at)
         VALUES ($1, $2, 'volume', $3, 'm3', 'validated', 'meter', 'mqtt', now())",
    )
    .bind(METER)
    .bind(ts)
    .bind(Decimal::from_str(value).unwrap())
    .execute(pool)
    .await
    .unwrap();
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn book_with_one_meter(db: &TestDatabase) {
    sqlx::query(
        "INSERT INTO meters (meter_id, protocol, meter_book) VALUES ($1, 'cjt188', 'CLI-1')",
    )
    .bind(METER)
    .execute(&db.pool)
    .await
    .unwrap();
    read(&db.pool, datetime!(2025-09-30 23:00 +8), "1000").await;
    read(&db.pool, datetime!(2025-10-31 23:30 +8), "1040").await;
}

#[tokio::test]
async fn bill_run_twice_creates_one_bill() {
    let db = TestDatabase::create().await;
    book_with_one_meter(&db).await;
    // A second meter of the book without reads: skipped with its reason, not an error.
    sqlx::query(
        "INSERT INTO meters (meter_id, protocol, meter_book) VALUES ('cjt188:00000000000502', 'cjt188', 'CLI-1')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let tariff = tariff();
    let args = [
        "bill-run",
        "--book",
        "CLI-1",
        "--from",
        "2025-10-01",
        "--to",
        "2025-11-01",
        "--tariff",
        &tariff,
    ];

    let first = pipeline(&db, &args).await;
    assert_eq!(first.code, 0, "{}{}", first.stdout, first.stderr);
    // 40 m3 on the Nan'an tariff: 20 × 2.80 + 15 × 3.73 + 5 × 6.50.
    assert!(
        first
            .stdout
            .contains("bills created 1, adjustments 0, unchanged 0, skipped 1, total 144.45 yuan"),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains("skipped cjt188:00000000000502: "),
        "{}",
        first.stdout
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM bills").await, 1);

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let second = pipeline(&db, &json_args).await;
    assert_eq!(second.code, 0, "{}{}", second.stdout, second.stderr);
    let summary: serde_json::Value = serde_json::from_str(second.stdout.trim()).unwrap();
    assert_eq!(summary["created"], 0, "{summary}");
    assert_eq!(summary["adjusted"], 0, "{summary}");
    assert_eq!(summary["unchanged"], 1, "{summary}");
    assert_eq!(
        summary["skipped"][0]["meter_id"], "cjt188:00000000000502",
        "{summary}"
    );
    assert_eq!(summary["total"], "0.00", "{summary}");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM bills").await,
        1,
        "the second run created no bill"
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM bill_runs WHERE finished_at IS NOT NULL"
        )
        .await,
        2
    );
    db.drop_database().await;
}

#[tokio::test]
async fn bill_run_refuses_bad_input() {
    let db = TestDatabase::create().await;
    book_with_one_meter(&db).await;
    let tariff = tariff();
    let base = |book: &'static str, from: &'static str, to: &'static str, tariff: String| {
        vec![
            "bill-run".to_owned(),
            "--book".into(),
            book.into(),
            "--from".into(),
            from.into(),
            "--to".into(),
            to.into(),
            "--tariff".into(),
            tariff,
        ]
    };
    let cases = [
        (
            base(
                "CLI-1",
                "2025-10-01",
                "2025-11-01",
                "/nonexistent.toml".into(),
            ),
            "cannot read tariff file /nonexistent.toml",
        ),
        (
            base("CLI-1", "2025-11-01", "2025-10-01", tariff.clone()),
            "--to 2025-10-01 must be after --from 2025-11-01",
        ),
        (
            base("CLI-1", "2025-10-32", "2025-11-01", tariff.clone()),
            "is not a date YYYY-MM-DD",
        ),
        (
            base("NO-SUCH-BOOK", "2025-10-01", "2025-11-01", tariff.clone()),
            "meter book \"NO-SUCH-BOOK\" has no meters",
        ),
    ];
    for (args, message) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = pipeline(&db, &args).await;
        assert_ne!(out.code, 0, "{args:?} succeeded: {}", out.stdout);
        assert!(
            out.stderr.contains(message),
            "{args:?}: expected {message:?} in {}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
    // A broken tariff file is reported with its line.
    let dir = tempdir();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&tariff)
            .unwrap()
            .replace("up_to = \"35\"", "up_to = \"15\""),
    )
    .unwrap();
    let out = pipeline(
        &db,
        &[
            "bill-run",
            "--book",
            "CLI-1",
            "--from",
            "2025-10-01",
            "--to",
            "2025-11-01",
            "--tariff",
            bad.to_str().unwrap(),
        ],
    )
    .await;
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("bad.toml:") && out.stderr.contains("up_to"),
        "{}",
        out.stderr
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(count(&db.pool, "SELECT count(*) FROM bills").await, 0);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM bill_runs").await, 0);
    db.drop_database().await;
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bill-run-cli-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn record_arrears_stores_and_clears() {
    let db = TestDatabase::create().await;
    book_with_one_meter(&db).await;
    let args = |amount: &'static str| {
        [
            "record-arrears",
            "--meter",
            METER,
            "--account",
            "ACC-77",
            "--amount",
            amount,
            "--overdue-since",
            "2025-09-01",
        ]
    };
    let out = pipeline(&db, &args("123.40")).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let stored = pipeline::billing::arrears_of(&db.pool, METER)
        .await
        .unwrap()
        .expect("arrears stored");
    assert_eq!(
        (
            stored.account_id.as_str(),
            stored.amount_overdue,
            stored.overdue_since
        ),
        (
            "ACC-77",
            Decimal::from_str("123.40").unwrap(),
            date!(2025 - 09 - 01)
        )
    );

    let out = pipeline(&db, &args("1.234")).await;
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("at most two decimals"),
        "{}",
        out.stderr
    );
    let mut unknown = args("5");
    unknown[2] = "cjt188:99999999999999";
    let out = pipeline(&db, &unknown).await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("unknown meter"), "{}", out.stderr);

    let out = pipeline(&db, &args("0")).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        pipeline::billing::arrears_of(&db.pool, METER)
            .await
            .unwrap()
            .is_none()
    );
    db.drop_database().await;
}
