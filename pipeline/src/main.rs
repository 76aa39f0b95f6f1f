//! `pipeline`: the central service. `pipeline migrate` applies the schema; `pipeline run`
//! runs one ingest worker (MQTT → VEE → PostgreSQL) until Ctrl-C or SIGTERM.

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    #[arg(long, default_value_t = 20_000)]
    max_batch_readings: usize,
    /// Longest wait for more messages before writing a batch, milliseconds.
    #[arg(long, default_value_t = 50)]
    max_batch_delay_ms: u64,
    /// Seconds between metric dumps in the log (Prometheus text).
    #[arg(long, default_value_t = 60)]
    metrics_interval_s: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate => {
            let pool = sqlx::PgPool::connect(&cli.database_url)
                .await
                .with_context(|| format!("connecting to {}", cli.database_url))?;
            pipeline::MIGRATOR
                .run(&pool)
                .await
                .context("running migrations")?;
            tracing::info!("migrations applied");
        }
        Command::Run(args) => run(&cli.database_url, args).await?,
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
    let metrics = std::sync::Arc::new(pipeline::ingest::IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let dump = std::sync::Arc::clone(&metrics);
    let interval = std::time::Duration::from_secs(args.metrics_interval_s.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            tracing::info!(metrics = %dump.render(), "ingest counters");
        }
    });
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down after the current batch");
        stop.send(true).ok();
    });
    pipeline::worker::run(config, pool, metrics, shutdown).await?;
    Ok(())
}
