//! Helpers for tests that need a real PostgreSQL: one fresh database per test.
//!
//! Tests never mock PostgreSQL. Each [`TestDatabase`] is a new database named
//! `wm_test_<pid>_<n>_<random>` on the server of `DATABASE_URL` (default: local, trust auth), with
//! every migration applied, so tests run in parallel without touching each other.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::database_url;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A freshly created and migrated database, dropped by [`TestDatabase::drop_database`] (or
/// left behind for inspection when a test fails; `.ci/run` removes leftovers).
#[derive(Debug)]
pub struct TestDatabase {
    /// Pool connected to the new database.
    pub pool: PgPool,
    /// Name of the database.
    pub name: String,
    /// Connection URL of the new database.
    pub url: String,
    admin: PgConnectOptions,
}

impl TestDatabase {
    /// Creates and migrates a new database.
    ///
    /// # Panics
    /// Panics with what to start when PostgreSQL is unreachable: tests must fail loudly.
    pub async fn create() -> Self {
        let db = Self::create_empty().await;
        crate::MIGRATOR
            .run(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("migrations failed on {}: {e}", db.name));
        db
    }

    /// Creates a new database with the migrations up to `last_version` applied (copied from
    /// `pipeline/migrations` into a temporary directory), so a test can fill an older schema
    /// and then apply the rest with [`TestDatabase::migrate_rest`].
    ///
    /// # Panics
    /// When PostgreSQL is unreachable or a migration fails: the test has failed.
    pub async fn create_migrated_to(last_version: i64) -> Self {
        let db = Self::create_empty().await;
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/migrations");
        let dir = std::env::temp_dir().join(format!("{}_migrations", db.name));
        std::fs::create_dir_all(&dir).expect("a temporary migrations directory");
        for entry in std::fs::read_dir(&src).expect("pipeline/migrations") {
            let path = entry.expect("a migration file").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let version: i64 = name
                .split('_')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(i64::MAX);
            if version <= last_version {
                std::fs::copy(&path, dir.join(name)).expect("copying a migration");
            }
        }
        let migrator = sqlx::migrate::Migrator::new(dir.as_path())
            .await
            .expect("reading the copied migrations");
        migrator
            .run(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("migrations failed on {}: {e}", db.name));
        std::fs::remove_dir_all(&dir).ok();
        db
    }

    /// Applies the migrations not applied yet.
    ///
    /// # Panics
    /// When a migration fails: the test has failed.
    pub async fn migrate_rest(&self) {
        crate::MIGRATOR
            .run(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("migrations failed on {}: {e}", self.name));
    }

    /// A pool of its own on this database, for a task the test aborts mid-query.
    ///
    /// A future dropped between a query's messages can hand its connection back to the pool
    /// with the protocol exchange half done; the next query on that connection then fails with
    /// `expected ParseComplete, got ReadyForQuery`. Giving the task its own pool keeps such a
    /// connection away from the test's [`TestDatabase::pool`]; close it after the abort.
    ///
    /// # Panics
    /// When PostgreSQL is unreachable: the test has failed.
    pub async fn separate_pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(8)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test database {}: {e}", self.name))
    }

    /// Creates a new database without any migration.
    async fn create_empty() -> Self {
        let admin_url = database_url();
        let admin: PgConnectOptions = admin_url
            .parse()
            .unwrap_or_else(|e| panic!("DATABASE_URL {admin_url:?} is not a PostgreSQL URL: {e}"));
        let mut conn = admin.connect().await.unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL at {admin_url} ({e}); start it with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
                 or run `bash .ci/run`"
            )
        });
        let name = format!(
            "wm_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        conn.close().await.ok();
        let options = admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test database {name}: {e}"));
        let url = options.to_url_lossy().to_string();
        Self {
            pool,
            name,
            url,
            admin,
        }
    }

    /// Closes the pool and drops the database.
    ///
    /// Never waits on connections a test still holds: sqlx's `Pool::close` waits for every
    /// checked-out connection, and whether it notices one held by the caller depended on a race
    /// in its permit accounting (an idle connection closed meanwhile released a spare permit).
    /// Under load the race went the other way and tests that kept a `PoolConnection` alive
    /// across this call hung until nextest killed them (issue 20). The close is bounded and the
    /// `DROP DATABASE … WITH (FORCE)` ends whatever is still connected.
    pub async fn drop_database(self) {
        if tokio::time::timeout(std::time::Duration::from_secs(5), self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!(
                database = %self.name,
                "a connection was still checked out when the test database was dropped"
            );
        }
        if let Ok(mut conn) = self.admin.connect().await {
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await
            .ok();
            conn.close().await.ok();
        }
    }
}

/// Waits until the workers reporting to `metrics` have folded their journal into the rollups
/// and meter state (nothing pending), for at most `within`.
///
/// # Panics
/// When something is still pending after `within`: the test has failed.
pub async fn wait_folded(metrics: &[&crate::ingest::IngestMetrics], within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let pending: u64 = metrics
            .iter()
            .map(|m| crate::ingest::IngestMetrics::get(&m.pending_spans))
            .sum();
        if pending == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pending} consumption spans still wait in the journal after {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A meter-clock volume read (m³, register 0) as an NB-IoT meter sends it through gateway
/// `gw-1`, received three seconds after `ts`.
///
/// # Panics
/// When `meter` is not a valid meter id.
pub fn volume_read(
    meter: &str,
    ts: time::OffsetDateTime,
    value: rust_decimal::Decimal,
) -> model::Reading {
    crate::reading(meter)
        .ts(ts)
        .value(value)
        .gateway("gw-1")
        .source(model::SourceKind::Coap, "nb")
        .frame_hash("ab".repeat(32))
        .received_at(ts + time::Duration::seconds(3))
        .build()
}

/// Validates `readings` against `vee` at `now` and writes them the way a manual read is
/// written: rollups and meter state upserted in the same transaction (no journal). Commits the
/// new states to `vee` once written.
///
/// # Panics
/// When the write fails: the test has failed.
pub async fn write_validated(
    pool: &PgPool,
    vee: &mut crate::vee::Vee,
    readings: Vec<model::Reading>,
    now: time::OffsetDateTime,
) -> crate::db::WriteStats {
    let out = vee.validate(readings, now);
    let mut conn = pool.acquire().await.expect("a connection");
    let stats = crate::db::write_batch(
        &mut conn,
        &crate::db::WriteSet {
            readings: &out.readings,
            mode: crate::db::WriteMode::Direct {
                usage: &out.usage,
                states: Some(&out.states),
            },
            out_of_order: &out.out_of_order,
            ..crate::db::WriteSet::default()
        },
        crate::db::StoreOptions::default(),
    )
    .await
    .expect("writing the batch");
    vee.commit(&out.states);
    stats
}
