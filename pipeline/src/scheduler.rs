//! The scheduler (任务调度): periodic jobs — bill runs once a closed cycle's reads are complete,
//! reading-partition upkeep, whatever the caller registers — each due time run **once across
//! every node** that runs a scheduler against the same database, every run recorded in
//! `job_runs` (the task execution log), and due times missed while no node was up caught up.
//!
//! Exactly once: a node claims a due run by taking a session advisory lock on (job, due time) and
//! inserting its `job_runs` row; a second node fails the lock or finds the row finished. A node
//! that dies mid-run releases its lock with its connection, so the next tick anywhere finds the
//! row still `running` and unlocked and runs it again (attempt + 1): jobs must be idempotent (bill
//! runs and partition upkeep are). Failed runs are retried up to [`MAX_ATTEMPTS`] times.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use sqlx::PgPool;
use time::{Date, Duration, Month, OffsetDateTime, Time, UtcOffset};

use crate::billing::{Cycle as BillCycle, RunOptions};
use crate::ledger;

/// Attempts of one due run before it stays `failed`.
pub const MAX_ATTEMPTS: i32 = 3;
/// Most due times of one job run in one tick when catching up (older ones wait for the next).
pub const MAX_CATCH_UP: usize = 100;
/// First key of the advisory locks of job runs (the second is a hash of job and due time).
const LOCK_CLASS: i32 = 0x5743_4a42; // "WCJB"

/// Errors of the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A schedule expression did not parse.
    #[error(
        "schedule {text:?}: {reason}; expected `every <n>s|m|h`, `daily HH:MM` or `monthly <day> HH:MM`"
    )]
    BadSchedule {
        /// The expression.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// The database refused a scheduler query.
    #[error("scheduler query ({what}) failed: {source}")]
    Database {
        /// Which query.
        what: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// A retention policy value out of range.
    #[error("reading retention policy: {0}")]
    BadPolicy(String),
    /// The database layer failed otherwise than in a statement.
    #[error(transparent)]
    Store(crate::db::StoreError),
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> SchedulerError {
    move |source| SchedulerError::Database { what, source }
}

/// When a job is due, in the scheduler's local time (UTC offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every fixed interval, aligned to the Unix epoch (so every node computes the same times).
    Every(Duration),
    /// Every day at a local time.
    Daily(Time),
    /// Every month on a day (1–28) at a local time.
    Monthly {
        /// Day of the month.
        day: u8,
        /// Local time.
        at: Time,
    },
}

impl Schedule {
    /// Parses `every 15m`, `every 30s`, `every 2h`, `daily 02:30` or `monthly 1 06:00`.
    pub fn parse(text: &str) -> Result<Schedule, SchedulerError> {
        let bad = |reason: &str| SchedulerError::BadSchedule {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let parse_time = |s: &str| -> Result<Time, SchedulerError> {
            let (h, m) = s.split_once(':').ok_or_else(|| bad("time is not HH:MM"))?;
            let h: u8 = h.parse().map_err(|_| bad("hour is not a number"))?;
            let m: u8 = m.parse().map_err(|_| bad("minute is not a number"))?;
            Time::from_hms(h, m, 0).map_err(|_| bad("time out of range"))
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["every", n] => {
                let (digits, unit) = n.split_at(n.len().saturating_sub(1));
                let n: i64 = digits
                    .parse()
                    .map_err(|_| bad("interval is not <n>s|m|h"))?;
                let d = match unit {
                    "s" => Duration::seconds(n),
                    "m" => Duration::minutes(n),
                    "h" => Duration::hours(n),
                    _ => return Err(bad("interval unit is not s, m or h")),
                };
                if n <= 0 {
                    return Err(bad("interval must be positive"));
                }
                Ok(Schedule::Every(d))
            }
            ["daily", at] => Ok(Schedule::Daily(parse_time(at)?)),
            ["monthly", day, at] => {
                let day: u8 = day.parse().map_err(|_| bad("day is not a number"))?;
                if !(1..=28).contains(&day) {
                    return Err(bad("day must be 1..=28 (every month has it)"));
                }
                Ok(Schedule::Monthly {
                    day,
                    at: parse_time(at)?,
                })
            }
            _ => Err(bad("unknown form")),
        }
    }

    /// Due times in `(after, until]`, oldest first, at most `limit`.
    pub fn due_between(
        &self,
        after: OffsetDateTime,
        until: OffsetDateTime,
        offset: UtcOffset,
        limit: usize,
    ) -> Vec<OffsetDateTime> {
        let mut out = Vec::new();
        let mut next = self.next_after(after, offset);
        while next <= until && out.len() < limit {
            out.push(next);
            next = self.next_after(next, offset);
        }
        out
    }

    /// The last due time at or before `t`.
    pub fn last_at_or_before(&self, t: OffsetDateTime, offset: UtcOffset) -> OffsetDateTime {
        match *self {
            Schedule::Every(d) => {
                let step = d.whole_seconds().max(1);
                OffsetDateTime::from_unix_timestamp(t.unix_timestamp().div_euclid(step) * step)
                    .unwrap_or(t)
            }
            Schedule::Daily(at) => {
                let today = t
                    .to_offset(offset)
                    .date()
                    .with_time(at)
                    .assume_offset(offset);
                if today <= t {
                    today
                } else {
                    today - Duration::days(1)
                }
            }
            Schedule::Monthly { day, at } => {
                let local = t.to_offset(offset);
                let (mut y, mut m) = (local.year(), local.month());
                loop {
                    if let Ok(d) = Date::from_calendar_date(y, m, day) {
                        let due = d.with_time(at).assume_offset(offset);
                        if due <= t {
                            return due;
                        }
                    }
                    if m == Month::January {
                        y -= 1;
                    }
                    m = m.previous();
                }
            }
        }
    }

    /// The first due time strictly after `t`.
    pub fn next_after(&self, t: OffsetDateTime, offset: UtcOffset) -> OffsetDateTime {
        match *self {
            Schedule::Every(d) => {
                let step = d.whole_seconds().max(1);
                let secs = t.unix_timestamp();
                let next = (secs.div_euclid(step) + 1) * step;
                OffsetDateTime::from_unix_timestamp(next).unwrap_or(t + d)
            }
            Schedule::Daily(at) => {
                let local = t.to_offset(offset);
                let today = local.date().with_time(at).assume_offset(offset);
                if today > t {
                    today
                } else {
                    today + Duration::days(1)
                }
            }
            Schedule::Monthly { day, at } => {
                let local = t.to_offset(offset);
                let (mut y, mut m) = (local.year(), local.month());
                loop {
                    if let Ok(d) = Date::from_calendar_date(y, m, day) {
                        let due = d.with_time(at).assume_offset(offset);
                        if due > t {
                            return due;
                        }
                    }
                    if m == Month::December {
                        y += 1;
                    }
                    m = m.next();
                }
            }
        }
    }
}

/// Which missed due times a job runs after downtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Every one, oldest first (each due time means different work, e.g. a cycle).
    All,
    /// Only the newest (upkeep that is the same work whenever it runs).
    Latest,
}

/// The work of a job for one due time: its result goes into `job_runs.detail`.
pub type JobFn =
    Arc<dyn Fn(PgPool, OffsetDateTime) -> BoxFuture<'static, Result<Value, String>> + Send + Sync>;

/// A registered job.
#[derive(Clone)]
pub struct Job {
    /// Unique name (`job_runs.job`).
    pub name: String,
    /// When it is due.
    pub schedule: Schedule,
    /// What happens to missed due times.
    pub catch_up: CatchUp,
    /// The work.
    pub run: JobFn,
}

/// A due run this node ran in a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Job name.
    pub job: String,
    /// Due time.
    pub due_at: OffsetDateTime,
    /// 1 for the first try.
    pub attempt: i32,
    /// Whether the job returned Ok.
    pub succeeded: bool,
}

/// Runs registered jobs; one per node, any number of nodes.
pub struct Scheduler {
    pool: PgPool,
    node: String,
    offset: UtcOffset,
    jobs: Vec<Job>,
}

impl Scheduler {
    /// A scheduler for `node` (its name in `job_runs`) with local times in `offset`.
    pub fn new(pool: PgPool, node: &str, offset: UtcOffset) -> Scheduler {
        Scheduler {
            pool,
            node: node.to_owned(),
            offset,
            jobs: Vec::new(),
        }
    }

    /// Adds a job.
    pub fn register(&mut self, job: Job) {
        self.jobs.push(job);
    }

    /// Runs what is due at `now` (and what was missed, and runs left by a dead node), in job
    /// order; returns what this node did.
    pub async fn tick(&self, now: OffsetDateTime) -> Result<Vec<Outcome>, SchedulerError> {
        let mut outcomes = Vec::new();
        for job in &self.jobs {
            // A job's history starts when a scheduler first saw it: no back-fill from the epoch.
            sqlx::query(
                "INSERT INTO scheduled_jobs (job, schedule, first_seen) VALUES ($1, $2, $3)
                 ON CONFLICT (job) DO UPDATE SET schedule = excluded.schedule
                 WHERE scheduled_jobs.schedule IS DISTINCT FROM excluded.schedule",
            )
            .bind(&job.name)
            .bind(format!("{:?}", job.schedule))
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db("registering a job"))?;
            let (first_seen, last_due): (OffsetDateTime, Option<OffsetDateTime>) = sqlx::query_as(
                "SELECT s.first_seen, (SELECT max(due_at) FROM job_runs r WHERE r.job = s.job)
                 FROM scheduled_jobs s WHERE s.job = $1",
            )
            .bind(&job.name)
            .fetch_one(&self.pool)
            .await
            .map_err(db("reading a job's last due time"))?;
            // Unfinished runs first: those of a node that died, and failed ones with tries left.
            let mut due: Vec<OffsetDateTime> = sqlx::query_scalar(
                "SELECT due_at FROM job_runs WHERE job = $1
                   AND (status = 'running' OR (status = 'failed' AND attempt < $2))
                 ORDER BY due_at",
            )
            .bind(&job.name)
            .bind(MAX_ATTEMPTS)
            .fetch_all(&self.pool)
            .await
            .map_err(db("finding unfinished runs"))?;
            // `job_runs` refers to `scheduled_jobs`, so a job's runs are never older than its first
            // sighting: history starts there.
            let after = last_due.unwrap_or(first_seen);
            let fresh = match job.catch_up {
                CatchUp::All => job
                    .schedule
                    .due_between(after, now, self.offset, MAX_CATCH_UP),
                // Only the newest due time; the missed ones are the same work.
                CatchUp::Latest => {
                    let newest = job.schedule.last_at_or_before(now, self.offset);
                    if newest > after {
                        vec![newest]
                    } else {
                        Vec::new()
                    }
                }
            };
            due.extend(fresh);
            for due_at in due {
                if let Some(outcome) = self.run_once(job, due_at).await? {
                    outcomes.push(outcome);
                }
            }
        }
        Ok(outcomes)
    }

    /// Claims (job, due_at) and runs it, unless another node holds it or it has finished.
    async fn run_once(
        &self,
        job: &Job,
        due_at: OffsetDateTime,
    ) -> Result<Option<Outcome>, SchedulerError> {
        let mut lock_conn = self.pool.acquire().await.map_err(db("a lock connection"))?;
        let key = format!("{}@{}", job.name, due_at.unix_timestamp());
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(&key)
            .fetch_one(&mut *lock_conn)
            .await
            .map_err(db("taking the run's lock"))?;
        if !locked {
            return Ok(None);
        }
        let result = self.claim_and_run(job, due_at).await;
        // Unlocked even when the run failed; a connection that cannot unlock is closed instead
        // of going back to the pool with the lock.
        if let Err(e) = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(&key)
            .execute(&mut *lock_conn)
            .await
        {
            tracing::warn!(job = %job.name, error = %e, "could not unlock a job run; closing its connection");
            drop(lock_conn.detach());
        }
        result
    }

    async fn claim_and_run(
        &self,
        job: &Job,
        due_at: OffsetDateTime,
    ) -> Result<Option<Outcome>, SchedulerError> {
        // With the lock held, a `running` row is one whose node died: take it over.
        let attempt: Option<i32> = sqlx::query_scalar(
            "INSERT INTO job_runs (job, due_at, node, status, attempt, started_at)
             VALUES ($1, $2, $3, 'running', 1, now())
             ON CONFLICT (job, due_at) DO UPDATE
                SET node = excluded.node, status = 'running', attempt = job_runs.attempt + 1,
                    started_at = now(), finished_at = NULL
              WHERE job_runs.status = 'running'
                 OR (job_runs.status = 'failed' AND job_runs.attempt < $4)
             RETURNING attempt",
        )
        .bind(&job.name)
        .bind(due_at)
        .bind(&self.node)
        .bind(MAX_ATTEMPTS)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("claiming a run"))?;
        let Some(attempt) = attempt else {
            return Ok(None);
        };
        tracing::info!(job = %job.name, %due_at, attempt, node = %self.node, "job run starts");
        let result = (job.run)(self.pool.clone(), due_at).await;
        let (status, detail) = match &result {
            Ok(detail) => ("succeeded", detail.clone()),
            Err(e) => {
                tracing::warn!(job = %job.name, %due_at, attempt, error = %e, "job run failed");
                ("failed", json!({ "error": e }))
            }
        };
        sqlx::query(
            "UPDATE job_runs SET status = $3, finished_at = now(), detail = $4
             WHERE job = $1 AND due_at = $2",
        )
        .bind(&job.name)
        .bind(due_at)
        .bind(status)
        .bind(&detail)
        .execute(&self.pool)
        .await
        .map_err(db("recording a run's end"))?;
        Ok(Some(Outcome {
            job: job.name.clone(),
            due_at,
            attempt,
            succeeded: result.is_ok(),
        }))
    }
}

/// Monthly partitions created by one upkeep run ([`ensure_partitions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionsCreated {
    /// `reading_rows` partitions (`readings_YYYYMM`).
    pub readings: i32,
    /// `api_call_log` partitions (`api_call_log_YYYYMM`, migration 0111).
    pub api_call_log: i32,
    /// `audit_log` partitions (`audit_log_YYYYMM`, migration 0111).
    pub audit_log: i32,
    /// `bills` partitions (`bills_YYYYMM`, each with its `bill_lines_YYYYMM`; migration 0140).
    pub bills: i32,
}

/// Creates the monthly partitions of readings, the API call log, the audit log and bills (with
/// their lines) from the month before `at` to three months after it (those missing only).
///
/// # Errors
/// [`SchedulerError::Database`] when the database refuses.
pub async fn ensure_partitions(
    pool: &PgPool,
    at: OffsetDateTime,
) -> Result<PartitionsCreated, SchedulerError> {
    let (readings, api_call_log, audit_log, bills): (i32, i32, i32, i32) = sqlx::query_as(
        "WITH m AS (SELECT (date_trunc('month', $1::timestamptz) - interval '1 month')::date AS m)
         SELECT wm_ensure_reading_partitions(m, 5),
                wm_ensure_monthly_partitions('api_call_log', 'at', m, 5),
                wm_ensure_monthly_partitions('audit_log', 'at', m, 5),
                wm_ensure_bill_partitions(m, 5)
         FROM m",
    )
    .bind(at)
    .fetch_one(pool)
    .await
    .map_err(db("creating monthly partitions"))?;
    Ok(PartitionsCreated {
        readings,
        api_call_log,
        audit_log,
        bills,
    })
}

/// Partition upkeep ([`ensure_partitions`]): readings, API call log, audit log and bills, last
/// month to three months ahead.
pub fn partitions_job(schedule: Schedule) -> Job {
    Job {
        name: "reading-partitions".into(),
        schedule,
        catch_up: CatchUp::Latest,
        run: Arc::new(|pool, due_at| {
            Box::pin(async move {
                let created = ensure_partitions(&pool, due_at)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(json!({
                    "partitions_created": created.readings,
                    "api_call_log_partitions_created": created.api_call_log,
                    "audit_log_partitions_created": created.audit_log,
                    "bills_partitions_created": created.bills,
                }))
            })
        }),
    }
}

/// What the reading-retention job keeps, archives and drops (docs/operations.md, "Retention").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Months of readings kept online (older whole months are archived).
    pub keep_months: i32,
    /// Months after which an archived month is dropped (≥ `keep_months`).
    pub drop_months: i32,
    /// Months of partitions created ahead.
    pub months_ahead: i32,
    /// Report the plan only; change nothing.
    pub dry_run: bool,
    /// Pack months that ended at least this many days ago into `reading_packs` /
    /// `frame_packs` ([`pack_closed_months`]); `None`: never pack.
    pub pack_after_days: Option<i32>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            keep_months: 36,
            drop_months: 120,
            months_ahead: 3,
            dry_run: false,
            pack_after_days: Some(DEFAULT_PACK_AFTER_DAYS),
        }
    }
}

/// Days after its end at which a month is packed by default (TimescaleDB's 0080 policy
/// compresses after 7 days; late reads for a packed month still work, they unpack it).
pub const DEFAULT_PACK_AFTER_DAYS: i32 = 7;

pub use crate::db::partitions::{Compaction, Packing, RetentionStep};

/// A database-layer error as the scheduler's own (a failed statement keeps its stage).
fn store(e: crate::db::StoreError) -> SchedulerError {
    match e {
        crate::db::StoreError::Stage { stage, source } => SchedulerError::Database {
            what: stage,
            source,
        },
        crate::db::StoreError::Database(source) => SchedulerError::Database {
            what: "reading storage maintenance",
            source,
        },
        other => SchedulerError::Store(other),
    }
}

/// Runs `wm_reading_retention` (migration 0081) at `at`: creates partitions ahead, archives
/// months older than the policy keeps to schema `wm_archive` (partition, its frames and
/// details), drops archived months past `drop_months`. Returns the steps, in order
/// ([`crate::db::partitions::run_retention`]).
///
/// # Errors
/// [`SchedulerError::Database`] when the database refuses (a bad policy is refused too).
pub async fn run_retention(
    pool: &PgPool,
    policy: RetentionPolicy,
    at: OffsetDateTime,
) -> Result<Vec<RetentionStep>, SchedulerError> {
    crate::db::partitions::run_retention(
        pool,
        crate::db::partitions::Retention {
            keep_months: policy.keep_months,
            drop_months: policy.drop_months,
            months_ahead: policy.months_ahead,
            dry_run: policy.dry_run,
        },
        at,
    )
    .await
    .map_err(store)
}

/// Compacts the primary-key index of every closed `readings_YYYYMM` partition once
/// ([`crate::db::partitions::compact_closed_months`]); a dry run only lists them.
///
/// # Errors
/// [`SchedulerError::Database`] when the database refuses.
pub async fn compact_closed_months(
    pool: &PgPool,
    at: OffsetDateTime,
    dry_run: bool,
) -> Result<Vec<Compaction>, SchedulerError> {
    crate::db::partitions::compact_closed_months(pool, at, dry_run)
        .await
        .map_err(store)
}

/// Packs every non-empty `readings_YYYYMM` partition whose month ended at least `after_days`
/// days before `at` ([`crate::db::partitions::pack_closed_months`], docs/storage.md, "Packed
/// months"). Oldest first; a dry run counts and changes nothing.
///
/// # Errors
/// [`SchedulerError::Database`] when the database refuses; [`SchedulerError::BadPolicy`]
/// for a negative `after_days`.
pub async fn pack_closed_months(
    pool: &PgPool,
    at: OffsetDateTime,
    after_days: i32,
    dry_run: bool,
) -> Result<Vec<Packing>, SchedulerError> {
    if after_days < 0 {
        return Err(SchedulerError::BadPolicy(format!(
            "pack_after_days must be 0 or more, got {after_days}"
        )));
    }
    crate::db::partitions::pack_closed_months(pool, at, after_days, dry_run)
        .await
        .map_err(store)
}

/// Reading retention and archiving as a job ([`run_retention`] at its due time), then the
/// packing of closed months ([`pack_closed_months`], when the policy packs) and the
/// compaction of the ones left in row form ([`compact_closed_months`]), same dry-run flag.
pub fn retention_job(schedule: Schedule, policy: RetentionPolicy) -> Job {
    Job {
        name: "reading-retention".into(),
        schedule,
        catch_up: CatchUp::Latest,
        run: Arc::new(move |pool, due_at| {
            Box::pin(async move {
                let steps = run_retention(&pool, policy, due_at)
                    .await
                    .map_err(|e| e.to_string())?;
                let packed = match policy.pack_after_days {
                    Some(days) => pack_closed_months(&pool, due_at, days, policy.dry_run)
                        .await
                        .map_err(|e| e.to_string())?,
                    None => Vec::new(),
                };
                let compacted = compact_closed_months(&pool, due_at, policy.dry_run)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(json!({
                    "dry_run": policy.dry_run,
                    "steps": steps
                        .iter()
                        .map(|(m, a, n)| json!({ "month": m, "action": a, "rows": n }))
                        .collect::<Vec<_>>(),
                    "packed": packed
                        .iter()
                        .map(|(m, s, r, f)| json!({ "month": m, "segments": s, "rows": r, "frames": f }))
                        .collect::<Vec<_>>(),
                    "compacted": compacted
                        .iter()
                        .map(|(m, b, a)| json!({ "month": m, "index_bytes_before": b, "index_bytes_after": a }))
                        .collect::<Vec<_>>(),
                }))
            })
        }),
    }
}

/// Review-queue upkeep: gathers new items (`review::collect`).
pub fn review_collect_job(schedule: Schedule) -> Job {
    Job {
        name: "review-collect".into(),
        schedule,
        catch_up: CatchUp::Latest,
        run: Arc::new(|pool, _| {
            Box::pin(async move {
                let added = crate::review::collect(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                serde_json::to_value(added).map_err(|e| e.to_string())
            })
        }),
    }
}

/// Retention of the API's call log, idempotency keys, nonces and decided approvals
/// (`api_retention::run`); `dry_run` only counts (the counts go into `job_runs.detail`).
pub fn api_retention_job(
    schedule: Schedule,
    policy: crate::api_retention::RetentionPolicy,
    dry_run: bool,
) -> Job {
    Job {
        name: "api-retention".into(),
        schedule,
        catch_up: CatchUp::Latest,
        run: Arc::new(move |pool, due| {
            Box::pin(async move {
                let report = crate::api_retention::run(&pool, due, policy, dry_run)
                    .await
                    .map_err(|e| e.to_string())?;
                serde_json::to_value(report).map_err(|e| e.to_string())
            })
        }),
    }
}

/// The arrears rule (`control::rules::arrears_run`) evaluated at the time it runs: reopens after
/// payment, closes where every safeguard allows. Its commands go to the command outbox, which
/// the control service publishes. Use it instead of `pipeline run --control-arrears` when several
/// nodes run: the scheduler evaluates each due time once.
pub fn arrears_job(schedule: Schedule, policy: crate::control::rules::ArrearsPolicy) -> Job {
    Job {
        name: "arrears-rule".into(),
        schedule,
        catch_up: CatchUp::Latest,
        run: Arc::new(move |pool, _| {
            let policy = policy.clone();
            Box::pin(async move {
                // Evaluated now, not at a missed due time: working hours and notice periods
                // are judged against the moment a command would go out.
                let report =
                    crate::control::rules::arrears_run(&pool, &policy, OffsetDateTime::now_utc())
                        .await
                        .map_err(|e| e.to_string())?;
                Ok(
                    json!({ "closed": report.closed, "reopened": report.reopened,
                    "decisions": report.decisions.len() }),
                )
            })
        }),
    }
}

/// Settings of the bill-run job.
#[derive(Clone)]
pub struct BillRunJob {
    /// Tariff versions in force (the same as `pipeline bill-run --tariff`).
    pub tariffs: Arc<billing_core::TariffBook>,
    /// Missing-read share a book may have and still be billed (the ledger's limit).
    pub max_missing_share: rust_decimal::Decimal,
    /// Bill-run options (UTC offset of the cycles, gate, concurrency).
    pub options: RunOptions,
    /// How many closed cycles back a book is still billed once complete.
    pub cycles_back: u32,
}

/// Bills every book whose cycle has closed, once its ledger says complete: each run of the job
/// looks at the last `cycles_back` closed cycles of each book and bills those without a
/// finished run; incomplete ones wait for a later run with the ledger's reasons in the detail.
pub fn bill_run_job(schedule: Schedule, settings: BillRunJob) -> Job {
    Job {
        name: "bill-runs".into(),
        schedule,
        catch_up: CatchUp::Latest,
        run: Arc::new(move |pool, due_at| {
            let settings = settings.clone();
            Box::pin(async move { bill_closed_cycles(&pool, due_at, &settings).await })
        }),
    }
}

/// The closed cycles of a book of cycle kind `cycle` (`monthly` or `bimonthly`, bimonthly
/// cycles starting in odd months) ending at or before `today`, newest first.
fn closed_cycles(cycle: &str, today: Date, back: u32) -> Vec<(Date, Date)> {
    let months = if cycle == "bimonthly" { 2 } else { 1 };
    let first_of = |y: i32, m: u8| {
        Date::from_calendar_date(y, Month::try_from(m).unwrap_or(Month::January), 1).ok()
    };
    let mut y = today.year();
    let mut m = u8::from(today.month());
    if months == 2 && m % 2 == 0 {
        m -= 1; // the current cycle started in the odd month before
    }
    let mut out = Vec::new();
    for _ in 0..back {
        let Some(end) = first_of(y, m) else { break };
        let (mut sy, mut sm) = (y, i32::from(m) - months);
        if sm < 1 {
            sm += 12;
            sy -= 1;
        }
        let Some(start) = first_of(sy, sm as u8) else {
            break;
        };
        out.push((start, end));
        (y, m) = (sy, sm as u8);
    }
    out
}

async fn bill_closed_cycles(
    pool: &PgPool,
    due_at: OffsetDateTime,
    s: &BillRunJob,
) -> Result<Value, String> {
    let today = due_at.to_offset(s.options.utc_offset).date();
    // Books of the registry, and books only named on meters (older data): monthly by default.
    let books: Vec<(String, String)> = sqlx::query_as(
        "SELECT book_code, cycle FROM meter_books
         UNION
         SELECT DISTINCT meter_book, 'monthly' FROM meters
          WHERE meter_book IS NOT NULL AND meter_book NOT IN (SELECT book_code FROM meter_books)
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| format!("listing meter books: {e}"))?;
    let mut report = Vec::new();
    for (book, cycle) in books {
        for (from, to) in closed_cycles(&cycle, today, s.cycles_back) {
            let billed: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM billing_cycles c JOIN bill_runs r USING (cycle_id)
                 WHERE c.meter_book = $1 AND c.period_start = $2 AND c.period_end = $3
                   AND r.finished_at IS NOT NULL)",
            )
            .bind(&book)
            .bind(from)
            .bind(to)
            .fetch_one(pool)
            .await
            .map_err(|e| format!("checking the runs of {book}: {e}"))?;
            if billed {
                continue;
            }
            let l = match ledger::book_ledger(
                pool,
                &book,
                from,
                to,
                s.options.utc_offset,
                s.max_missing_share,
            )
            .await
            {
                Ok(l) => l,
                Err(ledger::LedgerError::UnknownBook(_)) => continue,
                Err(e) => return Err(e.to_string()),
            };
            if !l.complete {
                report.push(
                    json!({ "book": book, "from": from.to_string(), "to": to.to_string(),
                    "outcome": "waiting", "because": l.incomplete_because }),
                );
                continue;
            }
            let cycle = BillCycle {
                meter_book: book.clone(),
                period_start: from,
                period_end: to,
            };
            let run = crate::billing::run_cycle_with(pool, &s.tariffs, &cycle, &s.options)
                .await
                .map_err(|e| format!("bill run of {book} {from}..{to}: {e}"))?;
            report.push(
                json!({ "book": book, "from": from.to_string(), "to": to.to_string(),
                "outcome": "billed", "run_id": run.run_id, "created": run.created.len(),
                "adjusted": run.adjusted.len(), "skipped": run.skipped.len() }),
            );
        }
    }
    Ok(json!({ "cycles": report }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime, offset, time};

    #[test]
    fn schedules_parse_and_refuse_with_the_reason() {
        assert_eq!(
            Schedule::parse("every 15m").unwrap(),
            Schedule::Every(Duration::minutes(15))
        );
        assert_eq!(
            Schedule::parse("daily 02:30").unwrap(),
            Schedule::Daily(time!(02:30))
        );
        assert_eq!(
            Schedule::parse("monthly 1 06:00").unwrap(),
            Schedule::Monthly {
                day: 1,
                at: time!(06:00)
            }
        );
        let err = Schedule::parse("monthly 31 06:00").unwrap_err().to_string();
        assert!(err.contains("day must be 1..=28"), "{err}");
        assert!(Schedule::parse("hourly").is_err());
        assert!(Schedule::parse("every 0m").is_err());
        assert!(Schedule::parse("daily 25:00").is_err());
    }

    #[test]
    fn due_times_in_local_time_across_month_ends() {
        let cst = offset!(+8);
        let daily = Schedule::Daily(time!(02:00));
        assert_eq!(
            daily.due_between(
                datetime!(2026-01-30 18:00 UTC),
                datetime!(2026-02-01 18:00 UTC),
                cst,
                10
            ),
            // `after` itself (31 Jan 02:00 local) is excluded, `until` included.
            [
                datetime!(2026-02-01 02:00 +8),
                datetime!(2026-02-02 02:00 +8)
            ]
        );
        let monthly = Schedule::Monthly {
            day: 1,
            at: time!(06:00),
        };
        assert_eq!(
            monthly.due_between(
                datetime!(2025-11-15 00:00 +8),
                datetime!(2026-02-01 06:00 +8),
                cst,
                10
            ),
            [
                datetime!(2025-12-01 06:00 +8),
                datetime!(2026-01-01 06:00 +8),
                datetime!(2026-02-01 06:00 +8)
            ]
        );
        let every = Schedule::Every(Duration::minutes(15));
        assert_eq!(
            every.due_between(
                datetime!(2026-01-01 00:07 UTC),
                datetime!(2026-01-01 00:45 UTC),
                cst,
                2
            ),
            [
                datetime!(2026-01-01 00:15 UTC),
                datetime!(2026-01-01 00:30 UTC)
            ]
        );
    }

    #[test]
    fn the_latest_due_time_at_or_before() {
        let cst = offset!(+8);
        let monthly = Schedule::Monthly {
            day: 1,
            at: time!(06:00),
        };
        assert_eq!(
            monthly.last_at_or_before(datetime!(2026-03-01 05:59 +8), cst),
            datetime!(2026-02-01 06:00 +8)
        );
        assert_eq!(
            monthly.last_at_or_before(datetime!(2026-03-01 06:00 +8), cst),
            datetime!(2026-03-01 06:00 +8)
        );
        let daily = Schedule::Daily(time!(02:00));
        assert_eq!(
            daily.last_at_or_before(datetime!(2026-01-01 01:00 +8), cst),
            datetime!(2025-12-31 02:00 +8)
        );
        let every = Schedule::Every(Duration::minutes(15));
        assert_eq!(
            every.last_at_or_before(datetime!(2026-01-01 00:44 UTC), cst),
            datetime!(2026-01-01 00:30 UTC)
        );
    }

    #[test]
    fn closed_cycles_of_monthly_and_bimonthly_books() {
        assert_eq!(
            closed_cycles("monthly", date!(2026 - 01 - 02), 2),
            [
                (date!(2025 - 12 - 01), date!(2026 - 01 - 01)),
                (date!(2025 - 11 - 01), date!(2025 - 12 - 01))
            ]
        );
        assert_eq!(
            closed_cycles("bimonthly", date!(2026 - 04 - 10), 2),
            [
                (date!(2026 - 01 - 01), date!(2026 - 03 - 01)),
                (date!(2025 - 11 - 01), date!(2026 - 01 - 01))
            ]
        );
    }
}
