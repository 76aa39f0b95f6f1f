//! Hot standby for ingest workers: one PostgreSQL advisory lock per worker assignment (topic
//! root, worker index, worker count, partition count). A worker holds it on a connection of its
//! own while it consumes; a second process started with the same assignment (and the same MQTT
//! client id) waits on it. When the active one dies, PostgreSQL drops its connection and the
//! lock with it, the standby takes the lock, connects with the same client id and receives the
//! persistent session's queued messages: the partitions move without a person, and no two
//! processes ever consume the same partitions at once.
//!
//! A worker that loses its lock connection (database restart, network partition) stops, so a
//! standby that got the lock meanwhile is the only consumer; a supervisor restarts it as the new
//! standby.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

/// First key of the assignment locks (the second is a hash of the assignment).
const LOCK_CLASS: i32 = 0x574b_4c4b; // "WKLK"
/// How often a standby retries the lock, and how often a holder checks its lock connection.
pub const POLL: Duration = Duration::from_millis(250);

/// Errors of the assignment lock.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The lock connection could not be opened or used.
    #[error("assignment lock {key:?}: {source}")]
    Database {
        /// The assignment.
        key: String,
        /// The driver's error.
        source: sqlx::Error,
    },
}

/// The assignment a worker consumes, as the lock's key.
pub fn assignment_key(topic_root: &str, worker: u16, workers: u16, partitions: u16) -> String {
    format!("{topic_root}|worker {worker} of {workers}|{partitions} partitions")
}

/// A held assignment lock; dropping it (or the process dying) releases it.
pub struct AssignmentLock {
    conn: PgConnection,
    key: String,
}

/// Takes the assignment lock, waiting while another process holds it (`on_standby` is called
/// once when it has to wait). Returns `None` if `shutdown` fires first.
pub async fn acquire(
    database_url: &str,
    key: &str,
    mut shutdown: watch::Receiver<bool>,
    on_standby: impl FnOnce(),
) -> Result<Option<AssignmentLock>, TakeoverError> {
    let err = |source| TakeoverError::Database {
        key: key.to_owned(),
        source,
    };
    let mut conn = PgConnection::connect(database_url).await.map_err(err)?;
    let mut on_standby = Some(on_standby);
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .map_err(err)?;
        if locked {
            return Ok(Some(AssignmentLock {
                conn,
                key: key.to_owned(),
            }));
        }
        if let Some(f) = on_standby.take() {
            f();
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return Ok(None),
        }
    }
}

impl AssignmentLock {
    /// The assignment.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Checks the lock connection every [`POLL`] until `shutdown`; if it fails, the lock may be
    /// another process's by now: sends `stop` and returns.
    pub async fn guard(mut self, stop: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let alive =
                tokio::time::timeout(POLL * 8, sqlx::query("SELECT 1").execute(&mut self.conn))
                    .await;
            if !matches!(alive, Ok(Ok(_))) {
                tracing::error!(
                    assignment = %self.key,
                    alarm = "assignment_lock_lost",
                    "lost the assignment lock's database connection; stopping so that a standby is the only consumer"
                );
                stop.send(true).ok();
                return;
            }
        }
    }
}
