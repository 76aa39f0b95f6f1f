//! `pipeline scheduler …`: runs the scheduled jobs on this node, or prints the execution log
//! (docs/operations.md, "Scheduler"); a thin wrapper over `pipeline::scheduler`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use pipeline::billing::RunOptions;
use pipeline::scheduler::{self, BillRunJob, Schedule, Scheduler};
use rust_decimal::Decimal;
use time::{OffsetDateTime, UtcOffset};

use crate::{load_tariffs, parse_offset};

#[derive(clap::Args)]
pub(crate) struct SchedulerArgs {
    #[command(subcommand)]
    command: SchedulerCommand,
}

// Parsed once per process; boxing the job flags would only obscure them.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum SchedulerCommand {
    /// Runs the jobs until Ctrl-C/SIGTERM (or one tick with `--once`). Start it on several nodes:
    /// each due run still runs once.
    Run {
        /// This node's name in the execution log.
        #[arg(long, default_value = "scheduler")]
        node: String,
        /// Seconds between ticks.
        #[arg(long, default_value_t = 30)]
        tick_s: u64,
        /// One tick, then exit (cron-style use and tests).
        #[arg(long)]
        once: bool,
        /// Local UTC offset of the schedules and of the bill cycles.
        #[arg(long, value_parser = parse_offset, default_value = "+08:00")]
        utc_offset: UtcOffset,
        /// Reading-partition upkeep schedule (`every <n>s|m|h`, `daily HH:MM`, `monthly D HH:MM`).
        #[arg(long, default_value = "daily 01:00")]
        partitions: String,
        /// Review-queue collect schedule.
        #[arg(long, default_value = "every 10m")]
        review_collect: String,
        /// Reading retention and archiving schedule (docs/operations.md, "Retention").
        #[arg(long, default_value = "monthly 2 02:00")]
        retention: String,
        /// Months of readings kept online; older whole months go to schema `wm_archive`.
        #[arg(long, default_value_t = 36)]
        keep_months: i32,
        /// Months after which an archived month is dropped (dump `wm_archive` before).
        #[arg(long, default_value_t = 120)]
        drop_months: i32,
        /// Retention only reports what it would do (in the job log); nothing changes.
        #[arg(long)]
        retention_dry_run: bool,
        /// Pack months that ended at least this many days ago (docs/storage.md, "Packed
        /// months"); `off` never packs.
        #[arg(long, default_value = "7")]
        pack_after_days: String,
        /// Evaluate the arrears rule (valve close/reopen with the safeguards) on this schedule;
        /// off without it. Do not also run `pipeline run --control-arrears`.
        #[arg(long)]
        arrears: Option<String>,
        #[command(flatten)]
        arrears_policy: crate::control_cli::PolicyArgs,
        /// API retention schedule (call log, idempotency keys, nonces, decided approvals);
        /// `off` to leave it to `api retention`.
        #[arg(long, default_value = "daily 03:30")]
        api_retention: String,
        /// Days of API call log kept.
        #[arg(long, default_value_t = 180)]
        call_log_days: i64,
        /// Days of push idempotency keys kept.
        #[arg(long, default_value_t = 7)]
        idempotency_days: i64,
        /// Days decided approval requests are kept.
        #[arg(long, default_value_t = 365)]
        approvals_days: i64,
        /// The API retention job only counts what it would delete (into the run's detail).
        #[arg(long)]
        api_retention_dry_run: bool,
        /// Bill-run schedule: each run bills the closed cycles whose reads are complete.
        #[arg(long, default_value = "daily 06:00")]
        bill_runs: String,
        /// Tariff files for the bill runs (without any, the bill-run job is not scheduled).
        #[arg(long = "tariff")]
        tariffs: Vec<PathBuf>,
        /// Missing-read share a book may have and still be billed.
        #[arg(long, default_value = "0.02")]
        max_missing_share: Decimal,
        /// Closed cycles back a book is still billed automatically once complete.
        #[arg(long, default_value_t = 2)]
        cycles_back: u32,
    },
    /// Prints the newest runs of the execution log.
    Log {
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// How many rows.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

type LogRow = (
    String,
    OffsetDateTime,
    String,
    String,
    i32,
    serde_json::Value,
);

pub(crate) async fn run(pool: sqlx::PgPool, args: SchedulerArgs) -> anyhow::Result<()> {
    match args.command {
        SchedulerCommand::Run {
            node,
            tick_s,
            once,
            utc_offset,
            partitions,
            review_collect,
            retention,
            keep_months,
            drop_months,
            retention_dry_run,
            pack_after_days,
            arrears,
            arrears_policy,
            api_retention,
            call_log_days,
            idempotency_days,
            approvals_days,
            api_retention_dry_run,
            bill_runs,
            tariffs,
            max_missing_share,
            cycles_back,
        } => {
            pipeline::MIGRATOR
                .run(&pool)
                .await
                .context("running migrations")?;
            let mut s = Scheduler::new(pool, &node, utc_offset);
            s.register(scheduler::partitions_job(Schedule::parse(&partitions)?));
            s.register(scheduler::review_collect_job(Schedule::parse(
                &review_collect,
            )?));
            s.register(scheduler::retention_job(
                Schedule::parse(&retention)?,
                scheduler::RetentionPolicy {
                    keep_months,
                    drop_months,
                    dry_run: retention_dry_run,
                    pack_after_days: parse_pack_after_days(&pack_after_days)?,
                    ..scheduler::RetentionPolicy::default()
                },
            ));
            if let Some(schedule) = arrears {
                s.register(scheduler::arrears_job(
                    Schedule::parse(&schedule)?,
                    arrears_policy.policy()?,
                ));
            }
            if api_retention != "off" {
                anyhow::ensure!(
                    call_log_days >= 1 && idempotency_days >= 1 && approvals_days >= 1,
                    "--call-log-days, --idempotency-days and --approvals-days must be at least 1"
                );
                s.register(scheduler::api_retention_job(
                    Schedule::parse(&api_retention)?,
                    pipeline::api_retention::RetentionPolicy {
                        call_log: time::Duration::days(call_log_days),
                        idempotency: time::Duration::days(idempotency_days),
                        approvals: time::Duration::days(approvals_days),
                    },
                    api_retention_dry_run,
                ));
            }
            if tariffs.is_empty() {
                tracing::warn!("no --tariff given: bill runs are not scheduled");
            } else {
                s.register(scheduler::bill_run_job(
                    Schedule::parse(&bill_runs)?,
                    BillRunJob {
                        tariffs: Arc::new(load_tariffs(&tariffs)?),
                        max_missing_share,
                        options: RunOptions {
                            actor: format!("scheduler {node}"),
                            utc_offset,
                            ..RunOptions::default()
                        },
                        cycles_back,
                    },
                ));
            }
            let mut stop = std::pin::pin!(crate::shutdown_signal());
            loop {
                for o in s.tick(OffsetDateTime::now_utc()).await? {
                    tracing::info!(job = %o.job, due_at = %o.due_at, attempt = o.attempt, succeeded = o.succeeded, "job run finished");
                }
                if once {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(tick_s)) => {}
                    () = &mut stop => break,
                }
            }
        }
        SchedulerCommand::Log { job, limit } => {
            let rows: Vec<LogRow> = sqlx::query_as(
                "SELECT job, due_at, node, status, attempt, detail FROM job_runs
                 WHERE $1::text IS NULL OR job = $1 ORDER BY due_at DESC, job LIMIT $2",
            )
            .bind(job)
            .bind(limit)
            .fetch_all(&pool)
            .await
            .context("reading job_runs")?;
            for (job, due_at, node, status, attempt, detail) in rows {
                println!("{due_at} {job:<20} {status:<10} attempt {attempt} on {node}: {detail}");
            }
        }
    }
    Ok(())
}

/// `--pack-after-days`: a number of days (0 or more) or `off`.
fn parse_pack_after_days(text: &str) -> anyhow::Result<Option<i32>> {
    if text == "off" {
        return Ok(None);
    }
    let days: i32 = text.parse().ok().filter(|d| *d >= 0).with_context(|| {
        format!("--pack-after-days {text:?}: expected a number of days (0 or more) or `off`")
    })?;
    Ok(Some(days))
}
