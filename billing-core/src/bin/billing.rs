//! `billing`: tariff checks and quotes for customer service and tests.
//!
//! `billing quote --tariff FILE --class residential --persons N --year-usage-before X --usage Y
//! [--date YYYY-MM-DD]` prints one JSON object with the lines per tier and component and
//! `"total":"123.45"`. `billing check FILE...` validates tariff files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use billing_core::{BillRequest, QuoteRequest, TariffBook, compute_bill, quote};
use clap::{Parser, Subcommand};
use rust_decimal::Decimal;
use time::{Date, OffsetDateTime, UtcOffset};

#[derive(Parser)]
#[command(
    name = "billing",
    about = "Tiered water tariffs: check files and quote bills"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prices a usage with the tariff applying on a date; prints JSON.
    Quote {
        /// Tariff file; repeat to give several versions (the newest effective on --date applies).
        #[arg(long = "tariff", required = true)]
        tariffs: Vec<PathBuf>,
        /// Customer class id (residential, non_residential, special, ...).
        #[arg(long, default_value = "residential")]
        class: String,
        /// Persons in the household.
        #[arg(long, default_value_t = 4)]
        persons: u32,
        /// m3 already billed earlier in the tier period (the year for annual tiers, the month
        /// for monthly tiers).
        #[arg(long, default_value = "0")]
        year_usage_before: Decimal,
        /// m3 to price.
        #[arg(long)]
        usage: Decimal,
        /// Date of the usage (default: today in China, UTC+8).
        #[arg(long, value_parser = parse_date)]
        date: Option<Date>,
        /// Township customer (township prices apply where the class has them).
        #[arg(long)]
        township: bool,
        /// Pretty-print the JSON.
        #[arg(long)]
        pretty: bool,
    },
    /// Recomputes a bill from its inputs (a `BillRequest` JSON, or the `inputs` column of a
    /// stored bill, which holds it under `request`); prints the bill as JSON.
    Bill {
        /// Tariff files (the versions the bill used).
        #[arg(long = "tariff", required = true)]
        tariffs: Vec<PathBuf>,
        /// JSON file with the inputs.
        #[arg(long)]
        inputs: PathBuf,
        /// Pretty-print the JSON.
        #[arg(long)]
        pretty: bool,
    },
    /// Validates tariff files and prints their versions.
    Check {
        /// Tariff files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn parse_date(s: &str) -> Result<Date, String> {
    Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|e| format!("{s:?} is not a date YYYY-MM-DD: {e}"))
}

fn load(files: &[PathBuf]) -> Result<TariffBook> {
    Ok(TariffBook::load(files)?)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Quote {
            tariffs,
            class,
            persons,
            year_usage_before,
            usage,
            date,
            township,
            pretty,
        } => {
            let book = load(&tariffs)?;
            let date = date.unwrap_or_else(|| {
                // China has one time zone without daylight saving.
                let offset = UtcOffset::from_hms(8, 0, 0).unwrap_or(UtcOffset::UTC);
                OffsetDateTime::now_utc().to_offset(offset).date()
            });
            let mut req = QuoteRequest::new(class, persons, year_usage_before, usage);
            req.township = township;
            let q = quote(&book, date, &req)?;
            let out = if pretty {
                serde_json::to_string_pretty(&q)?
            } else {
                serde_json::to_string(&q)?
            };
            println!("{out}");
        }
        Command::Bill {
            tariffs,
            inputs,
            pretty,
        } => {
            let book = load(&tariffs)?;
            let text = std::fs::read_to_string(&inputs)
                .with_context(|| format!("cannot read {}", inputs.display()))?;
            let mut value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", inputs.display()))?;
            if let Some(request) = value.get_mut("request") {
                value = request.take();
            }
            let request: BillRequest = serde_json::from_value(value)
                .with_context(|| format!("{} does not hold bill inputs", inputs.display()))?;
            let bill = compute_bill(&book, &request)?;
            let out = if pretty {
                serde_json::to_string_pretty(&bill)?
            } else {
                serde_json::to_string(&bill)?
            };
            println!("{out}");
        }
        Command::Check { files } => {
            let book = load(&files)?;
            for t in book.versions() {
                let classes: Vec<&str> = t.classes.iter().map(|c| c.id.as_str()).collect();
                println!(
                    "{}: ok, version {}, {:?}, classes {}",
                    t.file,
                    t.version,
                    t.status,
                    classes.join(", ")
                );
            }
        }
    }
    Ok(())
}
