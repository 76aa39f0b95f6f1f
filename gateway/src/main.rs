//! `gateway`: the edge runtime binary.
//!
//! - `gateway run --config FILE`: runs until SIGTERM/SIGINT; SIGHUP reloads the configuration
//!   (a bad new file is reported and the running configuration kept).
//! - `gateway check-config FILE`: validates a configuration; exit 0, or the errors and exit 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::runtime::Gateway;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "gateway", version, about = "Water-meter edge gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file.
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match edge_config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok (gateway {}, {} sources, {} devices)",
                    file.display(),
                    c.gateway_id,
                    c.sources.len(),
                    c.devices.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("gateway: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = edge_config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut gateway = Gateway::start(config)
        .await
        .context("starting the gateway")?;
    // Device sets from the registry ([registry] device_sets = true), applied in this loop.
    let mut device_sets = gateway.take_device_set_updates();
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!(config = %path.display(), "SIGHUP: reloading configuration");
                match edge_config::load(&path) {
                    Ok(new) => {
                        if let Err(e) = gateway.reload(new).await {
                            tracing::error!(error = %e, "reload failed; some sources may be stopped");
                        }
                    }
                    Err(errors) => {
                        for e in &errors.0 {
                            tracing::error!(error = %e, "configuration error; keeping the running configuration");
                        }
                    }
                }
            }
            Some(update) = async { match device_sets.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                let outcome = gateway.apply_device_set(&update.set).await;
                update.reply.send(outcome).ok();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}
