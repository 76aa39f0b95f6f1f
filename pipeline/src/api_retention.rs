//! Retention of the HTTP API's bookkeeping tables (issue 22): the six-field call log
//! (`api_call_log`), push idempotency keys (`api_idempotency`), expired nonces (`api_nonces`)
//! and decided second-approver requests (`api_approvals`). Run by `api retention` (cron) or the
//! scheduler's `api-retention` job; both can dry-run.
//!
//! The tables live in this crate's migrations (`0050_api.sql`, `0090_api_approvals.sql`), so the
//! job lives here too and the scheduler can run it without depending on the `api` crate.
//! Deletes go in batches of [`BATCH`] rows so a large backlog never holds long locks or a huge
//! transaction; repeated runs are idempotent.

use serde::Serialize;
use sqlx::PgPool;
use time::{Duration, OffsetDateTime};

/// Rows deleted per statement.
pub const BATCH: i64 = 10_000;

/// How long each kind of row is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Call-log rows older than this are deleted (default 180 days: two billing half-years of
    /// who-called-what for disputes; the audit log, kept forever, holds the state changes).
    pub call_log: Duration,
    /// Idempotency keys older than this (default 7 days: far beyond any client's retry window;
    /// a key replayed later is treated as a new request).
    pub idempotency: Duration,
    /// Approval requests decided, expired or executed longer ago than this (default 365 days;
    /// the approve/reject decisions themselves are also in the audit log).
    pub approvals: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            call_log: Duration::days(180),
            idempotency: Duration::days(7),
            approvals: Duration::days(365),
        }
    }
}

/// What a run deleted (or, dry, would delete).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Whether nothing was deleted (counts are what would go).
    pub dry_run: bool,
    /// `api_call_log` rows.
    pub call_log: u64,
    /// `api_idempotency` rows (finished ones only; a key still in progress is kept).
    pub idempotency: u64,
    /// `api_nonces` rows past their expiry.
    pub nonces: u64,
    /// Pending `api_approvals` marked `expired` (not deleted).
    pub approvals_expired: u64,
    /// Decided `api_approvals` rows deleted.
    pub approvals: u64,
}

/// Errors of the retention job.
#[derive(Debug, thiserror::Error)]
#[error("api retention ({what}) failed: {source}")]
pub struct RetentionError {
    /// Which table or step.
    pub what: &'static str,
    /// The driver's error.
    pub source: sqlx::Error,
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> RetentionError {
    move |source| RetentionError { what, source }
}

/// Counts or deletes, in batches, the rows a `WHERE` clause (with the cutoff as `$1`) selects.
async fn purge(
    pool: &PgPool,
    what: &'static str,
    table: &str,
    key: &str,
    cond: &str,
    cutoff: OffsetDateTime,
    dry_run: bool,
) -> Result<u64, RetentionError> {
    if dry_run {
        let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {table} WHERE {cond}"))
            .bind(cutoff)
            .fetch_one(pool)
            .await
            .map_err(db(what))?;
        return Ok(u64::try_from(n).unwrap_or(0));
    }
    let mut total = 0u64;
    loop {
        let done = sqlx::query(&format!(
            "DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {cond} LIMIT $2)"
        ))
        .bind(cutoff)
        .bind(BATCH)
        .execute(pool)
        .await
        .map_err(db(what))?
        .rows_affected();
        total += done;
        if i64::try_from(done).unwrap_or(i64::MAX) < BATCH {
            return Ok(total);
        }
    }
}

/// Applies `policy` as of `now`: expires pending approvals past their deadline, then deletes
/// (or with `dry_run` counts) the rows past their period.
///
/// # Errors
/// [`RetentionError`] naming the step the database refused.
pub async fn run(
    pool: &PgPool,
    now: OffsetDateTime,
    policy: RetentionPolicy,
    dry_run: bool,
) -> Result<RetentionReport, RetentionError> {
    let approvals_expired = if dry_run {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM api_approvals WHERE state = 'pending' AND expires_at <= $1",
        )
        .bind(now)
        .fetch_one(pool)
        .await
        .map_err(db("approvals expiry"))?;
        u64::try_from(n).unwrap_or(0)
    } else {
        sqlx::query(
            "UPDATE api_approvals SET state = 'expired', decided_at = expires_at
             WHERE state = 'pending' AND expires_at <= $1",
        )
        .bind(now)
        .execute(pool)
        .await
        .map_err(db("approvals expiry"))?
        .rows_affected()
    };
    let call_log = purge(
        pool,
        "call log",
        "api_call_log",
        "call_id",
        "at < $1",
        now - policy.call_log,
        dry_run,
    )
    .await?;
    let idempotency = purge(
        pool,
        "idempotency keys",
        "api_idempotency",
        "client_id, key",
        "created_at < $1 AND status IS NOT NULL",
        now - policy.idempotency,
        dry_run,
    )
    .await?;
    let nonces = purge(
        pool,
        "nonces",
        "api_nonces",
        "client_id, nonce",
        "expires_at < $1",
        now,
        dry_run,
    )
    .await?;
    let approvals = purge(
        pool,
        "approvals",
        "api_approvals",
        "approval_id",
        "state <> 'pending' AND state <> 'approved' AND coalesce(decided_at, expires_at) < $1",
        now - policy.approvals,
        dry_run,
    )
    .await?;
    Ok(RetentionReport {
        dry_run,
        call_log,
        idempotency,
        nonces,
        approvals_expired,
        approvals,
    })
}
