//! `detect-replay --meters meters.csv --readings readings.csv [--config detectors.toml]`: runs
//! the live worker's detectors over CSV history and prints one JSON line per alarm on stdout.
//! Bad rows are reported on stderr with their line number and skipped; counts go to stderr.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use pipeline::detect::{DetectConfig, replay};

/// Replays meter readings through the anomaly detectors.
#[derive(Debug, Parser)]
#[command(name = "detect-replay", version)]
struct Cli {
    /// Meter profiles: meter_id, meter_class, nominal_flow_q3_m3h, dma, role, time_zone.
    #[arg(long)]
    meters: PathBuf,
    /// Readings: meter_id, ts (RFC 3339), quantity, value, unit.
    #[arg(long)]
    readings: PathBuf,
    /// Thresholds per meter class (TOML); without it the documented defaults apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print at most this many bad-row messages (all are counted).
    #[arg(long, default_value_t = 100)]
    max_errors: usize,
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    // A stray non-UTF-8 byte spoils one row, not the file.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(p) => DetectConfig::from_toml(&read(p)?, &p.display().to_string())?,
        None => DetectConfig::default(),
    };
    let (meters, meter_errors) = replay::parse_meters(&read(&cli.meters)?, &config);
    let (rows, row_errors) = replay::parse_readings(&read(&cli.readings)?);
    let stderr = std::io::stderr();
    let mut err = stderr.lock();
    for e in meter_errors.iter().chain(&row_errors).take(cli.max_errors) {
        writeln!(err, "skipped {e}").ok();
    }
    let read_rows = rows.len();
    let (alarms, stats) = replay::run(config, &meters, rows);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for a in &alarms {
        serde_json::to_writer(&mut out, a).context("writing alarms")?;
        out.write_all(b"\n").context("writing alarms")?;
    }
    out.flush().context("writing alarms")?;
    writeln!(
        err,
        "meters {} ({} bad rows), readings {read_rows} ({} bad rows, {} duplicates, {} conflicting duplicates), alarms {}, detector state {} bytes for {} meters (+ {} bytes of meter-id map)",
        meters.len(),
        meter_errors.len(),
        row_errors.len(),
        stats.duplicates,
        stats.conflicts,
        alarms.len(),
        stats.state_bytes,
        stats.meters,
        stats.index_bytes,
    )
    .ok();
    Ok(())
}
