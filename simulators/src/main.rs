//! `simulate`: runs the simulated device fleet against a gateway, back-fills readings on a
//! simulated clock, or prints a scenario's ground truth.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use simulators::engine::{Delivery, Engine, unix};
use simulators::scenario::Scenario;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Simulated water-meter fleet.
#[derive(Debug, Parser)]
#[command(name = "simulate", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, `simulate --meters N` runs a back-fill.
    #[command(flatten)]
    backfill: BackfillArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generates readings for many meters on a simulated clock (faster than real time).
    Backfill(BackfillArgs),
    /// Prints the ground truth (injected events, DMA balances) of a scenario as JSON.
    GroundTruth {
        /// Scenario TOML file.
        scenario: PathBuf,
    },
}

#[derive(Debug, Args)]
struct BackfillArgs {
    /// Number of meters (ignored with --scenario).
    #[arg(long, default_value_t = 1000)]
    meters: u32,
    /// Simulated days (ignored with --scenario).
    #[arg(long, default_value_t = 1)]
    days: u32,
    /// Seed (ignored with --scenario).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Start of simulated time, RFC 3339 (ignored with --scenario).
    #[arg(long, default_value = "2026-01-01T00:00:00Z")]
    start: String,
    /// Reading interval in minutes (ignored with --scenario).
    #[arg(long, default_value_t = 60)]
    interval_minutes: u32,
    /// Run this scenario file instead of a plain fleet.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Write every delivered reading as JSON lines to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => backfill(&cli.backfill),
        Some(Command::Backfill(args)) => backfill(&args),
        Some(Command::GroundTruth { scenario }) => {
            let s = Scenario::load(&scenario)?;
            let truth = simulators::engine::ground_truth(&s);
            println!("{}", serde_json::to_string_pretty(&truth)?);
            Ok(())
        }
    }
}

fn backfill(args: &BackfillArgs) -> anyhow::Result<()> {
    let scenario = match &args.scenario {
        Some(path) => Scenario::load(path)?,
        None => {
            let start = OffsetDateTime::parse(&args.start, &Rfc3339)
                .with_context(|| format!("--start {:?} is not RFC 3339", args.start))?;
            let mut s = Scenario::plain(args.meters, args.days, args.seed, start);
            s.interval_minutes = args.interval_minutes;
            s.validate()?;
            s
        }
    };
    let meters = scenario.fleet.meters();
    let steps_per_day = 1440 / u64::from(scenario.interval_minutes);
    let total_steps = steps_per_day * u64::from(scenario.days);
    let mut engine = Engine::new(scenario);
    let ids: Vec<String> = engine
        .population()
        .meters
        .iter()
        .map(|m| m.id.as_str().to_owned())
        .collect();
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total_steps)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} steps ({per_sec}, eta {eta}) {msg}",
        )?
        .progress_chars("=> "),
    );
    let mut out = match &args.out {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {path:?}"))?,
        )),
        None => None,
    };
    let started = Instant::now();
    let mut delivered = 0u64;
    let mut write_error: Option<std::io::Error> = None;
    let mut sink = |e: &simulators::engine::Emission| {
        let copies = match e.delivery {
            Delivery::Lost => 0,
            Delivery::Duplicate => 2,
            Delivery::Normal | Delivery::Corrupt => 1,
        };
        delivered += copies;
        if let Some(w) = out.as_mut()
            && write_error.is_none()
        {
            for _ in 0..copies {
                let line = serde_json::json!({
                    "meter": ids.get(e.meter as usize),
                    "ts": unix(e.meter_ts).format(&Rfc3339).unwrap_or_default(),
                    "volume_m3": e.register_m3().to_string(),
                    "battery_pct": e.battery_pct,
                    "corrupt": e.delivery == Delivery::Corrupt,
                });
                if let Err(err) = writeln!(w, "{line}") {
                    write_error = Some(err);
                }
            }
        }
    };
    while !engine.finished() {
        engine.step(&mut sink);
        bar.inc(1);
        if engine.stats().steps.is_multiple_of(steps_per_day) {
            bar.set_message(format!("day {}", engine.stats().steps / steps_per_day));
        }
    }
    bar.finish_and_clear();
    if let Some(err) = write_error {
        return Err(err).context("writing readings");
    }
    if let Some(mut w) = out {
        w.flush().context("writing readings")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = engine.stats();
    let truth = engine.ground_truth();
    let meter_days = f64::from(meters) * f64::from(engine.scenario().days);
    let inflow: i64 = truth.dmas.iter().map(|d| d.inflow_l).sum();
    let registered: i64 = truth.dmas.iter().map(|d| d.registered_l).sum();
    let nrw = if inflow > 0 {
        100.0 * (inflow - registered) as f64 / inflow as f64
    } else {
        0.0
    };
    println!("scenario          {}", truth.scenario);
    println!("meters            {meters}");
    println!(
        "simulated         {} days, {} .. {}",
        engine.scenario().days,
        truth.start.format(&Rfc3339)?,
        truth.end.format(&Rfc3339)?
    );
    println!(
        "readings          {} produced, {delivered} delivered",
        stats.readings
    );
    println!(
        "link faults       {} lost, {} duplicated, {} corrupted, {} reordered",
        stats.lost, stats.duplicated, stats.corrupted, stats.reordered
    );
    println!("truth events      {}", truth.events.len());
    println!(
        "water balance     inflow {:.1} m3, registered {:.1} m3, non-revenue {nrw:.1} %",
        inflow as f64 / 1000.0,
        registered as f64 / 1000.0
    );
    println!(
        "elapsed           {elapsed:.2} s, {:.0} meter-days/s, {:.0} readings/s",
        meter_days / elapsed,
        stats.readings as f64 / elapsed
    );
    Ok(())
}
