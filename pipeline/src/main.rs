//! `pipeline`: the central service. At this stage it applies migrations; ingest comes with
//! issue 7.

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
    }
    Ok(())
}
