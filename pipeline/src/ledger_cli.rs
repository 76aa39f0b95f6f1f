//! `pipeline ledger …`: the read completeness ledger from the command line (docs/operations.md,
//! "Read completeness"); a thin wrapper over `pipeline::ledger`.

use anyhow::Context;
use clap::Subcommand;
use pipeline::ledger::{self, BookLedger};
use rust_decimal::Decimal;
use time::{Date, OffsetDateTime, UtcOffset};

use crate::{parse_date, parse_offset};

#[derive(clap::Args)]
pub(crate) struct LedgerArgs {
    #[command(subcommand)]
    command: LedgerCommand,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Expected vs received, validated, estimated, rejected and missing reads of every meter of
    /// a book in a cycle, and whether the book is complete enough to bill (exit code 0 either
    /// way; `complete` says it).
    Book {
        /// Meter book (`meters.meter_book`).
        #[arg(long)]
        book: String,
        /// First day of the cycle (local date, YYYY-MM-DD).
        #[arg(long, value_parser = parse_date)]
        from: Date,
        /// Day after the last day of the cycle (exclusive).
        #[arg(long, value_parser = parse_date)]
        to: Date,
        /// The book's UTC offset (cycle boundaries are local midnights).
        #[arg(long, value_parser = parse_offset, default_value = "+08:00")]
        utc_offset: UtcOffset,
        /// Share of missing reads a complete book may have (0.02 = 2 %).
        #[arg(long, default_value = "0.02")]
        max_missing_share: Decimal,
        /// Print the whole ledger as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Reads received per gateway and source in the last `--hours`, with lag percentiles.
    Sources {
        /// Window length, hours back from now.
        #[arg(long, default_value_t = 24)]
        hours: i64,
        /// Prometheus text instead of a table.
        #[arg(long)]
        prometheus: bool,
    },
}

pub(crate) async fn run(pool: sqlx::PgPool, args: LedgerArgs) -> anyhow::Result<()> {
    match args.command {
        LedgerCommand::Book {
            book,
            from,
            to,
            utc_offset,
            max_missing_share,
            json,
        } => {
            let l = ledger::book_ledger(&pool, &book, from, to, utc_offset, max_missing_share)
                .await
                .with_context(|| format!("ledger of book {book} for {from}..{to}"))?;
            if json {
                println!("{}", serde_json::to_string(&l)?);
            } else {
                print_book(&l);
            }
        }
        LedgerCommand::Sources { hours, prometheus } => {
            let until = OffsetDateTime::now_utc();
            let rows = ledger::source_ledger(&pool, until - time::Duration::hours(hours), until)
                .await
                .context("source ledger")?;
            if prometheus {
                print!("{}", ledger::source_ledger_prometheus(&rows));
            } else {
                println!(
                    "{:<20} {:<8} {:>8} {:>10} {:>10} {:>10} {:>10}",
                    "gateway", "source", "meters", "reads", "lag p50 s", "lag p95 s", "lag max s"
                );
                for r in rows {
                    println!(
                        "{:<20} {:<8} {:>8} {:>10} {:>10.0} {:>10.0} {:>10.0}",
                        r.gateway_id,
                        r.source,
                        r.meters,
                        r.reads,
                        r.lag_p50_s,
                        r.lag_p95_s,
                        r.lag_max_s
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_book(l: &BookLedger) {
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  end read",
        "meter", "expected", "received", "valid", "estimated", "rejected", "missing"
    );
    for m in &l.meters {
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
            m.meter_id,
            m.expected,
            m.received,
            m.validated,
            m.estimated,
            m.rejected,
            m.missing,
            if m.has_end_read { "yes" } else { "NO" }
        );
    }
    println!(
        "book {} {}..{}: {} meters, expected {}, received {}, validated {}, estimated {}, rejected {}, missing {} (share {}): {}",
        l.meter_book,
        l.period_start,
        l.period_end,
        l.meters.len(),
        l.expected,
        l.received,
        l.validated,
        l.estimated,
        l.rejected,
        l.missing,
        l.missing_share,
        if l.complete {
            "complete".to_owned()
        } else {
            format!("INCOMPLETE: {}", l.incomplete_because.join("; "))
        }
    );
}
