//! `pipeline`: the central service. `pipeline migrate` applies the schema; `pipeline run`
//! runs one ingest worker (MQTT → VEE → PostgreSQL) until Ctrl-C or SIGTERM; `pipeline bill-run`
//! runs one billing cycle of a meter book; `pipeline record-arrears` stores the arrears the
//! revenue system reports for a meter (docs/billing.md); `pipeline registry …` manages the
//! meter registry (docs/registry.md).

mod control_cli;
mod ledger_cli;
mod notify_cli;
mod registry_cli;
mod review_cli;
mod scheduler_cli;

use std::path::PathBuf;

use anyhow::{Context, bail};
use billing_core::TariffBook;
use clap::{Parser, Subcommand};
use pipeline::billing::{Arrears, Cycle, RunOptions, RunProgress, RunReport};
use rust_decimal::Decimal;
use time::{Date, OffsetDateTime, UtcOffset};

#[derive(Parser)]
#[command(about = "Water-meter telemetry pipeline")]
struct Cli {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", default_value = pipeline::config::DEFAULT_DATABASE_URL)]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Applies the schema migrations and exits.
    Migrate,
    /// Runs ingest worker `--worker` of `--workers` over `--partitions` partitions.
    Run(RunArgs),
    /// Runs one billing cycle of a meter book: bills every meter of the book from its reads
    /// (idempotent: a rerun on the same inputs creates no bill, corrected inputs an adjustment).
    BillRun(BillRunArgs),
    /// Records the arrears the revenue system reports for a meter (amount 0 clears them).
    RecordArrears(ArrearsArgs),
    /// The meter registry: import/export, lifecycle, books, models, gateway device sets.
    Registry(registry_cli::RegistryArgs),
    /// The read completeness ledger: expected vs received reads per book and cycle, arrivals
    /// and lag per gateway and source.
    Ledger(ledger_cli::LedgerArgs),
    /// Scheduled jobs (bill runs once reads are complete, partition upkeep), once per due
    /// time across every node; and their execution log.
    Scheduler(scheduler_cli::SchedulerArgs),
    /// Notifications: queues alarm notices by route and delivers the outbox (webhook, SMTP, SMS)
    /// with retries, until Ctrl-C/SIGTERM.
    Notify(notify_cli::NotifyArgs),
    /// The review queue: collect, list, assign and resolve what needs a person.
    Review(review_cli::ReviewArgs),
    /// Commands to devices and control rules (docs/control.md).
    Control(control_cli::ControlArgs),
}

#[derive(clap::Args)]
struct BillRunArgs {
    /// Meter book (`meters.meter_book`) to bill.
    #[arg(long)]
    book: String,
    /// First day of the cycle (local date, YYYY-MM-DD).
    #[arg(long, value_parser = parse_date)]
    from: Date,
    /// Day after the last day of the cycle (local date, YYYY-MM-DD; exclusive), e.g.
    /// `--from 2025-10-01 --to 2025-11-01` for October.
    #[arg(long, value_parser = parse_date)]
    to: Date,
    /// Tariff file; repeat to give several versions (the one in force on each day applies).
    #[arg(long = "tariff", required = true)]
    tariffs: Vec<PathBuf>,
    /// Who runs it (audit log).
    #[arg(long, default_value = "pipeline bill-run")]
    actor: String,
    /// UTC offset of the cycle's local dates.
    #[arg(long, default_value = "+08:00", value_parser = parse_offset)]
    utc_offset: UtcOffset,
    /// Days before a cycle boundary a read may be and still count as the boundary read.
    #[arg(long, default_value_t = 7)]
    read_window_days: u16,
    /// Billing gate: hold meters whose share of estimated or edited reads in the cycle is above
    /// this (0..1) for review. Default: no gate.
    #[arg(long)]
    max_estimated_share: Option<Decimal>,
    /// Meters billed at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Print the summary as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ArrearsArgs {
    /// The meter (must exist in `meters`).
    #[arg(long)]
    meter: String,
    /// The customer account in the revenue system.
    #[arg(long)]
    account: String,
    /// Yuan overdue, at most two decimals; 0 clears the record (paid).
    #[arg(long)]
    amount: Decimal,
    /// First day of the oldest unpaid bill's overdue period (YYYY-MM-DD).
    #[arg(long, value_parser = parse_date)]
    overdue_since: Date,
    /// Who records it (audit log).
    #[arg(long, default_value = "pipeline record-arrears")]
    actor: String,
}

fn parse_date(s: &str) -> Result<Date, String> {
    Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|e| format!("{s:?} is not a date YYYY-MM-DD: {e}"))
}

fn parse_offset(s: &str) -> Result<UtcOffset, String> {
    UtcOffset::parse(
        s,
        time::macros::format_description!("[offset_hour sign:mandatory]:[offset_minute]"),
    )
    .map_err(|e| format!("{s:?} is not a UTC offset like +08:00: {e}"))
}

#[derive(clap::Args)]
struct RunArgs {
    /// MQTT broker URL.
    #[arg(long, env = "MQTT_URL", default_value = pipeline::config::DEFAULT_MQTT_URL)]
    mqtt_url: String,
    /// Topic root of every topic (`{root}/readings/{partition}`).
    #[arg(long, env = "WM_TOPIC_ROOT", default_value = "wm/v1")]
    topic_root: String,
    /// This worker's index, 0..workers.
    #[arg(long, default_value_t = 0)]
    worker: u16,
    /// Number of workers sharing the partitions (worker i owns p % workers == i).
    #[arg(long, default_value_t = 1)]
    workers: u16,
    /// Number of partitions the gateways publish on.
    #[arg(long, default_value_t = 16)]
    partitions: u16,
    /// MQTT client id; must stay the same across restarts (persistent session).
    #[arg(long)]
    client_id: Option<String>,
    /// Readings per database transaction (upper bound).
    #[arg(long, default_value_t = 40_000)]
    max_batch_readings: usize,
    /// Longest wait for more messages before writing a batch while the writer is still busy
    /// with the previous one, milliseconds (idle, a batch is written at once).
    #[arg(long, default_value_t = 50)]
    max_batch_delay_ms: u64,
    /// Every reading takes the bulk path: no priority lane for the meters with a valve and
    /// `auto_close_on_burst` (docs/control.md, "priority lane").
    #[arg(long)]
    no_priority_lane: bool,
    /// Longest time consumption spans wait in the ingest journal before they are folded into
    /// the daily rollups, milliseconds (they are folded sooner when idle).
    #[arg(long, default_value_t = 5_000)]
    rollup_interval_ms: u64,
    /// Longest time meter states wait in the ingest journal before a checkpoint writes them
    /// to `meter_state`, seconds (sooner when idle).
    #[arg(long, default_value_t = 30)]
    state_checkpoint_s: u64,
    /// Seconds between metric dumps in the log (Prometheus text).
    #[arg(long, default_value_t = 60)]
    metrics_interval_s: u64,
    /// Serve the counters as Prometheus text on `GET /metrics` at this address (e.g.
    /// 127.0.0.1:9187); off without it.
    #[arg(long, env = "PIPELINE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Detector thresholds per meter class (TOML, docs/detectors.md); defaults without it.
    #[arg(long)]
    detectors: Option<std::path::PathBuf>,
    /// What the communication-loss sweep judges silence against: `wall` (the wall clock and
    /// each meter's uplink cadence; production) or `event-time` (the newest reading time this
    /// worker validated; a replayed or simulated fleet whose time runs faster than the clock).
    #[arg(long, value_enum, default_value_t = pipeline::detect::SweepNow::Wall)]
    sweep_clock: pipeline::detect::SweepNow,
    /// Seconds between communication-loss sweeps.
    #[arg(long, default_value_t = 60)]
    sweep_interval_s: u64,
    /// Also run the control service (command outbox, acks, rules) as a task of this process
    /// (run it in one process only; docs/control.md).
    #[arg(long)]
    control: bool,
    /// With --control: run the arrears rule too.
    #[arg(long, requires = "control")]
    control_arrears: bool,
    #[command(flatten)]
    control_policy: control_cli::PolicyArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Logs go to stderr, so stdout carries only results (e.g. `bill-run --json`).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate => {
            let pool = connect(&cli.database_url).await?;
            pipeline::MIGRATOR
                .run(&pool)
                .await
                .context("running migrations")?;
            tracing::info!("migrations applied");
        }
        Command::Run(args) => run(&cli.database_url, args).await?,
        Command::BillRun(args) => bill_run(&cli.database_url, args).await?,
        Command::RecordArrears(args) => record_arrears(&cli.database_url, args).await?,
        Command::Registry(args) => {
            registry_cli::run(connect(&cli.database_url).await?, args).await?
        }
        Command::Ledger(args) => ledger_cli::run(connect(&cli.database_url).await?, args).await?,
        Command::Notify(args) => notify_cli::run(connect(&cli.database_url).await?, args).await?,
        Command::Review(args) => review_cli::run(connect(&cli.database_url).await?, args).await?,
        Command::Scheduler(args) => {
            scheduler_cli::run(connect(&cli.database_url).await?, args).await?
        }
        Command::Control(args) => control_cli::run(connect(&cli.database_url).await?, args).await?,
    }
    Ok(())
}

async fn connect(database_url: &str) -> anyhow::Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(database_url)
        .await
        .with_context(|| format!("connecting to {database_url}"))
}

fn load_tariffs(files: &[PathBuf]) -> anyhow::Result<TariffBook> {
    Ok(TariffBook::load(files)?)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
struct Bar(indicatif::ProgressBar);

impl RunProgress for Bar {
    fn start(&self, meters: usize) {
        self.0.set_length(u64::try_from(meters).unwrap_or(u64::MAX));
    }
    fn meter_done(&self, _meter_id: &str) {
        self.0.inc(1);
    }
}

async fn bill_run(database_url: &str, args: BillRunArgs) -> anyhow::Result<()> {
    if args.to <= args.from {
        bail!(
            "the cycle is empty: --to {} must be after --from {} (--to is the day after the last day)",
            args.to,
            args.from
        );
    }
    if let Some(share) = args.max_estimated_share
        && !(Decimal::ZERO..=Decimal::ONE).contains(&share)
    {
        bail!("--max-estimated-share {share} must be between 0 and 1");
    }
    let book = load_tariffs(&args.tariffs)?;
    let pool = connect(database_url).await?;
    let meters: i64 = sqlx::query_scalar("SELECT count(*) FROM meters WHERE meter_book = $1")
        .bind(&args.book)
        .fetch_one(&pool)
        .await
        .context("counting the meters of the book (is the schema applied? `pipeline migrate`)")?;
    if meters == 0 {
        bail!("meter book {:?} has no meters", args.book);
    }
    let cycle = Cycle {
        meter_book: args.book.clone(),
        period_start: args.from,
        period_end: args.to,
    };
    let options = RunOptions {
        actor: args.actor,
        utc_offset: args.utc_offset,
        read_window: time::Duration::days(i64::from(args.read_window_days)),
        max_estimated_share: args.max_estimated_share,
        concurrency: args.concurrency.max(1),
    };
    let bar = Bar(indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} meters ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    ));
    bar.0.set_message(format!("billing book {}", args.book));
    let report = pipeline::billing::run_cycle_observed(&pool, &book, &cycle, &options, &bar)
        .await
        .with_context(|| {
            format!(
                "bill run of book {} for {}..{} failed",
                args.book, args.from, args.to
            )
        })?;
    bar.0.finish_and_clear();
    let total = run_total(&pool, &report).await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "run_id": report.run_id,
                "cycle_id": report.cycle_id,
                "meter_book": args.book,
                "period_start": args.from.to_string(),
                "period_end": args.to.to_string(),
                "created": report.created.len(),
                "adjusted": report.adjusted.len(),
                "unchanged": report.unchanged.len(),
                "skipped": report.skipped,
                "created_bill_ids": report.created,
                "adjustment_bill_ids": report.adjusted,
                "total": total.to_string(),
            })
        );
    } else {
        for s in &report.skipped {
            println!("skipped {}: {}", s.meter_id, s.reason);
        }
        println!(
            "bill run {} of book {} {}..{} (cycle {}): bills created {}, adjustments {}, unchanged {}, skipped {}, total {} yuan",
            report.run_id,
            args.book,
            args.from,
            args.to,
            report.cycle_id,
            report.created.len(),
            report.adjusted.len(),
            report.unchanged.len(),
            report.skipped.len(),
            total
        );
    }
    Ok(())
}

/// Sum of the totals of the bills this run wrote (adjustments count with their difference),
/// in yuan with two decimals.
async fn run_total(pool: &sqlx::PgPool, report: &RunReport) -> anyhow::Result<Decimal> {
    let ids: Vec<i64> = report
        .created
        .iter()
        .chain(&report.adjusted)
        .copied()
        .collect();
    let total: Option<Decimal> =
        sqlx::query_scalar("SELECT sum(total) FROM bills WHERE bill_id = ANY($1)")
            .bind(&ids)
            .fetch_one(pool)
            .await
            .context("summing the bills of the run")?;
    let mut total = total.unwrap_or(Decimal::ZERO);
    total.rescale(2);
    Ok(total)
}

async fn record_arrears(database_url: &str, args: ArrearsArgs) -> anyhow::Result<()> {
    let pool = connect(database_url).await?;
    let known: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM meters WHERE meter_id = $1)")
            .bind(&args.meter)
            .fetch_one(&pool)
            .await
            .context("looking up the meter (is the schema applied? `pipeline migrate`)")?;
    if !known {
        bail!("unknown meter {:?}", args.meter);
    }
    let arrears = Arrears {
        meter_id: args.meter.clone(),
        account_id: args.account,
        amount_overdue: args.amount,
        overdue_since: args.overdue_since,
        reported_at: OffsetDateTime::now_utc(),
    };
    pipeline::billing::record_arrears(&pool, &arrears, &args.actor).await?;
    if args.amount.is_zero() {
        println!("arrears of {} cleared", args.meter);
    } else {
        println!(
            "arrears of {}: {} yuan overdue since {}",
            args.meter, arrears.amount_overdue, args.overdue_since
        );
    }
    Ok(())
}

async fn run(database_url: &str, args: RunArgs) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(database_url)
        .await
        .with_context(|| format!("connecting to {database_url}"))?;
    pipeline::MIGRATOR
        .run(&pool)
        .await
        .context("running migrations")?;
    let mut config = pipeline::worker::WorkerConfig::new(
        &args.mqtt_url,
        &args.topic_root,
        args.worker,
        args.workers,
        args.partitions,
    )?;
    if let Some(id) = args.client_id {
        config.client_id = id;
    }
    config.max_batch_readings = args.max_batch_readings;
    config.max_batch_delay = std::time::Duration::from_millis(args.max_batch_delay_ms);
    config.priority_lane = !args.no_priority_lane;
    config.flush_interval = std::time::Duration::from_millis(args.rollup_interval_ms);
    config.state_checkpoint_interval = std::time::Duration::from_secs(args.state_checkpoint_s);
    config.sweep_now = args.sweep_clock;
    config.sweep_interval = std::time::Duration::from_secs(args.sweep_interval_s.max(1));
    if let Some(path) = &args.detectors {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        config.detect =
            pipeline::detect::DetectConfig::from_toml(&text, &path.display().to_string())?;
    }
    let metrics = std::sync::Arc::new(pipeline::ingest::IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let dump = std::sync::Arc::clone(&metrics);
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener on {addr}"))?;
        tracing::info!(%addr, "serving /metrics");
        let (metrics, shutdown) = (std::sync::Arc::clone(&metrics), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = pipeline::metrics_http::serve(listener, metrics, shutdown).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
    }
    let interval = std::time::Duration::from_secs(args.metrics_interval_s.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            tracing::info!(metrics = %dump.render(), "ingest counters");
        }
    });
    let lock_lost = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down after the current batch");
        stop.send(true).ok();
    });
    // Hot standby: one process per assignment consumes; another started with the same
    // assignment waits here and takes over when the first dies (docs/operations.md).
    let key = pipeline::takeover::assignment_key(
        &config.topic_root,
        config.worker,
        config.workers,
        config.partitions,
    );
    let lock = pipeline::takeover::acquire(database_url, &key, shutdown.clone(), || {
        tracing::info!(assignment = %key, "another process holds this assignment: standing by");
    })
    .await?;
    let Some(lock) = lock else {
        return Ok(());
    };
    tracing::info!(assignment = %lock.key(), "assignment lock taken: consuming");
    tokio::spawn(lock.guard(lock_lost, shutdown.clone()));
    if config.worker == 0 {
        // One consumer of the gateways' alarms and status for the whole pipeline.
        tokio::spawn(pipeline::detect::gateway::run(
            pool.clone(),
            config.broker.clone(),
            format!("{}-gw-alarms", config.client_id),
            config.topic_root.clone(),
            shutdown.clone(),
        ));
    }
    if args.control {
        let mut control = pipeline::control::service::ServiceConfig::new(
            &args.mqtt_url,
            &args.topic_root,
            &format!("{}-control", config.client_id),
        )?;
        if args.control_arrears {
            control.arrears = Some(args.control_policy.policy()?);
        }
        // In one process: the worker hands its alarms to the service directly (no broker
        // round trip before a burst auto-close); the broker copy is still published.
        let (tap, local) = tokio::sync::mpsc::unbounded_channel();
        config.alarm_tap = Some(tap);
        let (pool, shutdown) = (pool.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = pipeline::control::service::run_with_local_alarms(
                pool,
                control,
                shutdown,
                Some(local),
            )
            .await
            {
                tracing::error!(error = %e, "control service stopped");
            }
        });
    }
    // Boxed: the worker future is large (clippy::large_futures).
    Box::pin(pipeline::worker::run(config, pool, metrics, shutdown)).await?;
    Ok(())
}
