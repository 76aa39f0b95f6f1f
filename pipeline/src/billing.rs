//! Bill runs (REV-002 抄表开账 / IF-REV-005): per meter book and billing cycle, bills computed by
//! `billing-core` from validated register reads, stored with the reads and tariff versions used.
//!
//! A run is idempotent: a meter whose bill already stands on the same inputs (reads, household,
//! tier position, tariff versions; see [`billing_core::Bill::fingerprint`]) gets nothing new.
//! When the inputs changed (a corrected or actual read replaced an estimate, an earlier cycle was
//! corrected) the run adds an adjustment bill (next revision) that reverses the previous charges
//! and charges the corrected ones; nothing is overwritten. Every bill and run is audited.
//!
//! Arrears reported by the revenue system are stored here too ([`record_arrears`]): they feed
//! the valve-control policy ([`meters_in_arrears`]).

use billing_core::run_policy::{self, Revision, Skip, StandingBill};
use billing_core::{
    BillLine, BillRequest, LineKind, RegisterRead, Replacement, TariffBook, adjustment_lines,
    bill_total, compute_bill,
};
use futures::StreamExt;
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use time::{Date, Duration, Month, OffsetDateTime, UtcOffset};

/// Why a bill run failed. Meters that cannot be billed do not fail the run: they are reported
/// in [`RunReport::skipped`].
#[derive(Debug, thiserror::Error)]
pub enum BillingRunError {
    /// The database refused or could not be reached.
    #[error("database error while {step}")]
    Database {
        /// What the run was doing.
        step: &'static str,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// A query of the database layer failed (reads of stored readings).
    #[error(transparent)]
    Store(#[from] crate::db::StoreError),
    /// Bill inputs could not be encoded or decoded as JSON.
    #[error("bill inputs of meter {meter} cannot be encoded or decoded")]
    Json {
        /// The meter.
        meter: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// An arrears record is not acceptable.
    #[error("bad arrears record for meter {meter}: {reason}")]
    BadArrears {
        /// The meter.
        meter: String,
        /// What is wrong.
        reason: &'static str,
    },
}

fn db(step: &'static str) -> impl FnOnce(sqlx::Error) -> BillingRunError {
    move |source| BillingRunError::Database { step, source }
}

/// A billing cycle of a meter book: `[period_start, period_end)` in local dates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// Meter book (抄表册) billed.
    pub meter_book: String,
    /// First day.
    pub period_start: Date,
    /// Day after the last day.
    pub period_end: Date,
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Who runs it (audit log).
    pub actor: String,
    /// Offset of the local dates of cycles (China: UTC+8, no daylight saving).
    pub utc_offset: UtcOffset,
    /// How far before a cycle boundary a read may be and still count as the boundary read.
    pub read_window: Duration,
    /// Billing gate (DOMAIN.md §1): a meter whose share of estimated or edited reads in the
    /// cycle is above this (0..1) is held for review instead of billed. `None`: no gate.
    pub max_estimated_share: Option<Decimal>,
    /// Meters billed at once (each in its own transaction).
    pub concurrency: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            actor: "billing-run".to_owned(),
            utc_offset: UtcOffset::from_hms(8, 0, 0).unwrap_or(UtcOffset::UTC),
            read_window: Duration::days(7),
            max_estimated_share: None,
            concurrency: 4,
        }
    }
}

/// A meter the run did not bill, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedMeter {
    /// The meter.
    pub meter_id: String,
    /// Why (no read near a boundary, register decreased, no tariff, ...).
    pub reason: String,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunReport {
    /// The run (`bill_runs.run_id`).
    pub run_id: i64,
    /// The cycle (`billing_cycles.cycle_id`).
    pub cycle_id: i64,
    /// New original bills.
    pub created: Vec<i64>,
    /// New adjustment bills.
    pub adjusted: Vec<i64>,
    /// Meters whose bill already stands on the same inputs.
    pub unchanged: Vec<String>,
    /// Meters not billed.
    pub skipped: Vec<SkippedMeter>,
}

enum Outcome {
    Created(i64),
    Adjusted(i64),
    Unchanged,
    Skipped(String),
}

struct MeterRow {
    meter_id: String,
    class: String,
    persons: i32,
    township: bool,
    capacity: Decimal,
}

/// Runs `cycle` with default options (actor `billing-run`, UTC+8 dates, 7-day read window).
///
/// # Errors
/// [`BillingRunError`] when the database fails; meters that cannot be billed are skipped.
pub async fn run_cycle(
    pool: &PgPool,
    book: &TariffBook,
    cycle: &Cycle,
) -> Result<RunReport, BillingRunError> {
    run_cycle_with(pool, book, cycle, &RunOptions::default()).await
}

/// Told how a run progresses (e.g. to draw a progress bar); `()` ignores it.
pub trait RunProgress: Sync {
    /// The run found `meters` meters to bill.
    fn start(&self, meters: usize) {
        let _ = meters;
    }
    /// One meter is done (billed, unchanged, skipped or failed).
    fn meter_done(&self, meter_id: &str) {
        let _ = meter_id;
    }
}

impl RunProgress for () {}

/// Runs `cycle`: bills every meter of the book installed during the cycle.
///
/// # Errors
/// [`BillingRunError`] when the database fails; bills already written by this run stay (each
/// meter is its own transaction) and a rerun continues idempotently.
pub async fn run_cycle_with(
    pool: &PgPool,
    book: &TariffBook,
    cycle: &Cycle,
    options: &RunOptions,
) -> Result<RunReport, BillingRunError> {
    run_cycle_observed(pool, book, cycle, options, &()).await
}

/// [`run_cycle_with`], telling `progress` how many meters there are and when each is done.
///
/// # Errors
/// As [`run_cycle_with`].
pub async fn run_cycle_observed(
    pool: &PgPool,
    book: &TariffBook,
    cycle: &Cycle,
    options: &RunOptions,
    progress: &dyn RunProgress,
) -> Result<RunReport, BillingRunError> {
    let (cycle_id,): (i64,) = sqlx::query_as(
        "INSERT INTO billing_cycles (meter_book, period_start, period_end) VALUES ($1, $2, $3)
         ON CONFLICT (meter_book, period_start, period_end) DO UPDATE SET meter_book = EXCLUDED.meter_book
         RETURNING cycle_id",
    )
    .bind(&cycle.meter_book)
    .bind(cycle.period_start)
    .bind(cycle.period_end)
    .fetch_one(pool)
    .await
    .map_err(db("creating the billing cycle"))?;
    let (run_id,): (i64,) =
        sqlx::query_as("INSERT INTO bill_runs (cycle_id, actor) VALUES ($1, $2) RETURNING run_id")
            .bind(cycle_id)
            .bind(&options.actor)
            .fetch_one(pool)
            .await
            .map_err(db("recording the run"))?;
    let start_ts = cycle
        .period_start
        .midnight()
        .assume_offset(options.utc_offset);
    let end_ts = cycle
        .period_end
        .midnight()
        .assume_offset(options.utc_offset);
    let meters: Vec<(String, String, i32, bool, Decimal)> = sqlx::query_as(
        "SELECT meter_id, customer_class, persons, township, register_capacity FROM meters
         WHERE meter_book = $1 AND (installed_at IS NULL OR installed_at < $3)
           AND (retired_at IS NULL OR retired_at > $2)
         ORDER BY meter_id",
    )
    .bind(&cycle.meter_book)
    .bind(start_ts)
    .bind(end_ts)
    .fetch_all(pool)
    .await
    .map_err(db("listing the meters of the book"))?;

    progress.start(meters.len());
    let mut report = RunReport {
        run_id,
        cycle_id,
        ..RunReport::default()
    };
    // Meters are independent (each its own transaction and lock), so a few run at once: the
    // run is bound by database round trips, not CPU.
    let outcomes: Vec<(String, Result<Outcome, BillingRunError>)> = futures::stream::iter(meters)
        .map(
            |(meter_id, class, persons, township, capacity)| async move {
                let meter = MeterRow {
                    meter_id,
                    class,
                    persons,
                    township,
                    capacity,
                };
                let outcome =
                    bill_meter(pool, book, cycle, cycle_id, run_id, &meter, options).await;
                progress.meter_done(&meter.meter_id);
                (meter.meter_id, outcome)
            },
        )
        .buffered(options.concurrency.max(1))
        .collect()
        .await;
    for (meter_id, outcome) in outcomes {
        match outcome? {
            Outcome::Created(id) => report.created.push(id),
            Outcome::Adjusted(id) => report.adjusted.push(id),
            Outcome::Unchanged => report.unchanged.push(meter_id),
            Outcome::Skipped(reason) => {
                tracing::warn!(meter = %meter_id, cycle_id, %reason, "meter not billed");
                report.skipped.push(SkippedMeter { meter_id, reason });
            }
        }
    }

    let detail = serde_json::json!({ "skipped": report.skipped, "unchanged": report.unchanged });
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    sqlx::query(
        "UPDATE bill_runs SET finished_at = now(), created = $2, adjusted = $3, unchanged = $4, skipped = $5,
             detail = $6 WHERE run_id = $1",
    )
    .bind(run_id)
    .bind(count(report.created.len()))
    .bind(count(report.adjusted.len()))
    .bind(count(report.unchanged.len()))
    .bind(count(report.skipped.len()))
    .bind(&detail)
    .execute(pool)
    .await
    .map_err(db("finishing the run"))?;
    sqlx::query("UPDATE billing_cycles SET status = 'billed' WHERE cycle_id = $1")
        .bind(cycle_id)
        .execute(pool)
        .await
        .map_err(db("closing the cycle"))?;
    audit(
        pool,
        &options.actor,
        "bill_run",
        "billing_cycle",
        &cycle_id.to_string(),
        serde_json::json!({
            "run_id": run_id,
            "meter_book": cycle.meter_book,
            "created": report.created.len(),
            "adjusted": report.adjusted.len(),
            "unchanged": report.unchanged.len(),
            "skipped": report.skipped.len(),
        }),
    )
    .await?;
    tracing::info!(
        cycle_id,
        run_id,
        created = report.created.len(),
        adjusted = report.adjusted.len(),
        unchanged = report.unchanged.len(),
        skipped = report.skipped.len(),
        "bill run finished"
    );
    Ok(report)
}

async fn audit<'e, E>(
    executor: E,
    actor: &str,
    action: &str,
    entity: &str,
    entity_id: &str,
    detail: serde_json::Value,
) -> Result<(), BillingRunError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    sqlx::query("INSERT INTO audit_log (actor, action, entity, entity_id, detail) VALUES ($1, $2, $3, $4, $5)")
        .bind(actor)
        .bind(action)
        .bind(entity)
        .bind(entity_id)
        .bind(detail)
        .execute(executor)
        .await
        .map_err(db("writing the audit log"))?;
    Ok(())
}

/// Returns the billable volume read of `meter` at or before `boundary` and after `after`: an
/// actual read wins over an estimate, then the latest wins. The bill run's start and end read;
/// public so tests check the very query bills are made from
/// ([`crate::db::readings::boundary_read`]).
///
/// # Errors
/// [`BillingRunError::Store`] when the query fails.
pub async fn boundary_read(
    conn: &mut PgConnection,
    meter: &str,
    boundary: OffsetDateTime,
    after: OffsetDateTime,
) -> Result<Option<RegisterRead>, BillingRunError> {
    let read = crate::db::readings::boundary_read(&mut *conn, meter, boundary, after).await?;
    Ok(read.map(|r| RegisterRead {
        ts: r.ts,
        value: r.value.normalize(),
        estimated: r.quality == "estimated",
    }))
}

/// Returns `(billable, estimated or edited)`: how many billable volume reads of `meter` lie in
/// `(from, to]` and how many of them are not actual reads (the billing gate of
/// [`RunOptions::max_estimated_share`]; [`crate::db::readings::estimated_share`]).
///
/// # Errors
/// [`BillingRunError::Store`] when the query fails.
pub async fn estimated_share(
    conn: &mut PgConnection,
    meter: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<(i64, i64), BillingRunError> {
    Ok(crate::db::readings::estimated_share(&mut *conn, meter, from, to).await?)
}

/// Stored with every bill: everything needed to reproduce it.
#[derive(Serialize)]
struct StoredInputs<'a> {
    request: &'a BillRequest,
    usage: &'a billing_core::Usage,
    estimated: bool,
    segments: &'a [billing_core::Segment],
    total: Decimal,
}

async fn bill_meter(
    pool: &PgPool,
    book: &TariffBook,
    cycle: &Cycle,
    cycle_id: i64,
    run_id: i64,
    meter: &MeterRow,
    options: &RunOptions,
) -> Result<Outcome, BillingRunError> {
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    // Serialises concurrent runs of the same cycle and meter, so two runs never both add a
    // revision (a hash collision only serialises two meters; the unique key is the backstop).
    sqlx::query("SELECT pg_advisory_xact_lock($1::int4, hashtext($2))")
        .bind(i32::try_from(cycle_id % i64::from(i32::MAX)).unwrap_or(0))
        .bind(&meter.meter_id)
        .execute(&mut *tx)
        .await
        .map_err(db("locking the meter's bill"))?;
    let id = meter.meter_id.as_str();
    let json_err = |source| BillingRunError::Json {
        meter: id.to_owned(),
        source,
    };
    let start_boundary = cycle
        .period_start
        .midnight()
        .assume_offset(options.utc_offset);
    let end_boundary = cycle
        .period_end
        .midnight()
        .assume_offset(options.utc_offset);

    // Start read: the end read of the bill of the cycle that ended where this one starts
    // (continuity: every m3 is billed once), else the read at the start boundary. That cycle
    // started before this one: `b.period_start < $2` skips the bill months from this one on.
    let previous_end: Option<(serde_json::Value,)> = sqlx::query_as(
        "SELECT b.inputs->'request'->'end' FROM bills b JOIN billing_cycles c ON c.cycle_id = b.cycle_id
         WHERE b.meter_id = $1 AND c.period_end = $2 AND b.period_start < $2
         ORDER BY b.created_at DESC, b.revision DESC LIMIT 1",
    )
    .bind(id)
    .bind(cycle.period_start)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("reading the previous bill"))?;
    let start = match previous_end {
        Some((v,)) => Some(serde_json::from_value::<RegisterRead>(v).map_err(json_err)?),
        None => {
            boundary_read(
                &mut tx,
                id,
                start_boundary,
                start_boundary - options.read_window,
            )
            .await?
        }
    };
    let Some(start) = start else {
        return Ok(Outcome::Skipped(
            Skip::NoStartRead {
                window_days: options.read_window.whole_days(),
                boundary: start_boundary,
            }
            .to_string(),
        ));
    };
    let after = run_policy::end_read_after(start.ts, end_boundary, options.read_window);
    let Some(end) = boundary_read(&mut tx, id, end_boundary, after).await? else {
        return Ok(Outcome::Skipped(
            Skip::NoEndRead {
                after,
                boundary: end_boundary,
            }
            .to_string(),
        ));
    };
    if options.max_estimated_share.is_some() {
        let (total, doubtful) = estimated_share(&mut tx, id, start.ts, end.ts).await?;
        if let Err(skip) =
            run_policy::check_estimated_share(total, doubtful, options.max_estimated_share)
        {
            return Ok(Outcome::Skipped(skip.to_string()));
        }
    }
    let replacements: Vec<Replacement> = sqlx::query_as(
        "SELECT replaced_at, old_final_value, new_initial_value FROM meter_replacements
         WHERE meter_id = $1 AND replaced_at > $2 AND replaced_at <= $3 ORDER BY replaced_at",
    )
    .bind(id)
    .bind(start.ts)
    .bind(end.ts)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading meter replacements"))?
    .into_iter()
    .map(
        |(at, old_final, new_initial): (OffsetDateTime, Decimal, Decimal)| Replacement {
            at,
            old_final,
            new_initial,
        },
    )
    .collect();
    let replacement = match run_policy::single_replacement(&replacements) {
        Ok(r) => r,
        Err(skip) => return Ok(Outcome::Skipped(skip.to_string())),
    };

    // Tier position: usage of this meter's standing bills in the same tariff year before this
    // cycle, taken per segment so a cycle across 1 January counts only its new-year part.
    // Cycles that ended by this one's start began before it: `b.period_start < $2` leaves out
    // the bill months from this one on (bills are partitioned by their cycle's first day).
    let year_start = Date::from_calendar_date(cycle.period_start.year(), Month::January, 1)
        .unwrap_or(cycle.period_start);
    let (year_usage_before,): (Decimal,) = sqlx::query_as(
        "SELECT COALESCE(SUM((s->>'usage')::numeric), 0)
         FROM bills b JOIN billing_cycles c ON c.cycle_id = b.cycle_id
         CROSS JOIN LATERAL jsonb_array_elements(b.inputs->'segments') s
         WHERE b.meter_id = $1 AND c.period_end <= $2 AND c.period_end > $3 AND c.cycle_id <> $4
           AND b.period_start < $2
           AND (s->>'from')::date >= $3
           AND b.revision = (SELECT max(b2.revision) FROM bills b2
                             WHERE b2.cycle_id = b.cycle_id AND b2.meter_id = b.meter_id
                               AND b2.period_start = b.period_start)",
    )
    .bind(id)
    .bind(cycle.period_start)
    .bind(year_start)
    .bind(cycle_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(db("summing the tariff-year usage"))?;

    let request = BillRequest {
        meter: id.to_owned(),
        class: meter.class.clone(),
        persons: u32::try_from(meter.persons).unwrap_or(1),
        township: meter.township,
        period_start: cycle.period_start,
        period_end: cycle.period_end,
        start,
        end,
        capacity: meter.capacity.normalize(),
        replacement,
        year_usage_before: year_usage_before.normalize(),
    };
    let bill = match compute_bill(book, &request) {
        Ok(b) => b,
        Err(e) => return Ok(Outcome::Skipped(e.to_string())),
    };
    let fingerprint = bill.fingerprint();

    let latest: Option<(i64, i32, Option<String>, Option<Decimal>)> = sqlx::query_as(
        "SELECT bill_id, revision, inputs_hash, effective_total FROM bills
         WHERE cycle_id = $1 AND meter_id = $2 AND period_start = $3 ORDER BY revision DESC LIMIT 1",
    )
    .bind(cycle_id)
    .bind(id)
    .bind(cycle.period_start)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("reading the standing bill"))?;
    let standing = latest
        .as_ref()
        .map(|(bill_id, revision, hash, _)| StandingBill {
            bill_id: *bill_id,
            revision: *revision,
            inputs_hash: hash.as_deref(),
        });
    let (revision, adjusts, lines, total) =
        match run_policy::choose_revision(standing, &fingerprint) {
            Revision::Unchanged => return Ok(Outcome::Unchanged),
            Revision::Original => (0, None, bill.lines.clone(), bill.total),
            Revision::Adjustment { adjusts, revision } => {
                // The standing bill is of this cycle: it sits in this cycle's month.
                let previous = charge_lines(&mut tx, adjusts, cycle.period_start).await?;
                let lines = adjustment_lines(&previous, &bill.lines);
                let total = bill_total(&lines);
                (revision, Some(adjusts), lines, total)
            }
        };
    let inputs = serde_json::to_value(StoredInputs {
        request: &bill.request,
        usage: &bill.usage,
        estimated: bill.estimated,
        segments: &bill.segments,
        total: bill.total,
    })
    .map_err(json_err)?;
    let kind = if adjusts.is_some() {
        "adjustment"
    } else {
        "original"
    };
    let (bill_id,): (i64,) = sqlx::query_as(
        "INSERT INTO bills (cycle_id, meter_id, revision, adjusts_bill_id, customer_class, tariff_name,
             tariff_version, start_ts, end_ts, start_value, end_value, usage_m3, estimated, total, inputs,
             kind, effective_total, inputs_hash, run_id, period_start, adjusts_period_start)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
             $20, $21)
         RETURNING bill_id",
    )
    .bind(cycle_id)
    .bind(id)
    .bind(revision)
    .bind(adjusts)
    .bind(&meter.class)
    .bind(bill.tariff_name())
    .bind(bill.tariff_version())
    .bind(bill.request.start.ts)
    .bind(bill.request.end.ts)
    .bind(bill.request.start.value)
    .bind(bill.request.end.value)
    .bind(bill.usage.total)
    .bind(bill.estimated)
    .bind(total)
    .bind(&inputs)
    .bind(kind)
    .bind(bill.total)
    .bind(&fingerprint)
    .bind(run_id)
    // The partition key (migration 0140): the cycle's first day, for the bill and, as an
    // adjustment adjusts the standing bill of the same cycle, for the bill it adjusts.
    .bind(cycle.period_start)
    .bind(adjusts.map(|_| cycle.period_start))
    .fetch_one(&mut *tx)
    .await
    .map_err(db("inserting the bill"))?;
    // All lines in one statement: a bill has 2–20 lines, a run thousands of bills.
    let line_no: Vec<i32> = (1..).take(lines.len()).collect();
    let component: Vec<&str> = lines.iter().map(|l| l.line.component.as_str()).collect();
    let tier: Vec<i32> = lines
        .iter()
        .map(|l| i32::try_from(l.line.tier).unwrap_or(i32::MAX))
        .collect();
    let volume: Vec<Decimal> = lines.iter().map(|l| l.line.volume_m3).collect();
    let unit_price: Vec<Decimal> = lines.iter().map(|l| l.line.unit_price).collect();
    let amount: Vec<Decimal> = lines.iter().map(|l| l.line.amount).collect();
    let line_kind: Vec<&str> = lines.iter().map(|l| l.kind.as_str()).collect();
    let from: Vec<Date> = lines.iter().map(|l| l.from).collect();
    let to: Vec<Date> = lines.iter().map(|l| l.to).collect();
    let version: Vec<&str> = lines.iter().map(|l| l.tariff_version.as_str()).collect();
    sqlx::query(
        "INSERT INTO bill_lines (bill_id, period_start, line_no, component, tier, volume_m3, unit_price,
             amount, kind, period_from, period_to, tariff_version)
         SELECT $1, $12, * FROM UNNEST($2::int4[], $3::text[], $4::int4[], $5::numeric[], $6::numeric[],
             $7::numeric[], $8::text[], $9::date[], $10::date[], $11::text[])",
    )
    .bind(bill_id)
    .bind(&line_no)
    .bind(&component)
    .bind(&tier)
    .bind(&volume)
    .bind(&unit_price)
    .bind(&amount)
    .bind(&line_kind)
    .bind(&from)
    .bind(&to)
    .bind(&version)
    .bind(cycle.period_start)
    .execute(&mut *tx)
    .await
    .map_err(db("inserting bill lines"))?;
    let action = if adjusts.is_some() {
        "bill.adjust"
    } else {
        "bill.create"
    };
    audit(
        &mut *tx,
        &options.actor,
        action,
        "bill",
        &bill_id.to_string(),
        serde_json::json!({
            "cycle_id": cycle_id,
            "run_id": run_id,
            "meter_id": id,
            "revision": revision,
            "adjusts_bill_id": adjusts,
            "total": total,
            "effective_total": bill.total,
            "estimated": bill.estimated,
            "tariff_version": bill.tariff_version(),
        }),
    )
    .await?;
    tx.commit().await.map_err(db("committing the bill"))?;
    Ok(if adjusts.is_some() {
        Outcome::Adjusted(bill_id)
    } else {
        Outcome::Created(bill_id)
    })
}

/// The charge lines of bill `bill_id`, whose partition is the month of `period_start`.
async fn charge_lines(
    tx: &mut Transaction<'_, Postgres>,
    bill_id: i64,
    period_start: Date,
) -> Result<Vec<BillLine>, BillingRunError> {
    type LineRow = (
        String,
        i32,
        Decimal,
        Decimal,
        Decimal,
        Option<Date>,
        Option<Date>,
        Option<String>,
    );
    let rows: Vec<LineRow> = sqlx::query_as(
        "SELECT component, tier, volume_m3, unit_price, amount, period_from, period_to, tariff_version
         FROM bill_lines WHERE bill_id = $1 AND period_start = $2 AND kind = 'charge' ORDER BY line_no",
    )
    .bind(bill_id)
    .bind(period_start)
    .fetch_all(&mut **tx)
    .await
    .map_err(db("reading the previous bill lines"))?;
    Ok(rows
        .into_iter()
        .map(
            |(component, tier, volume_m3, unit_price, amount, from, to, version)| BillLine {
                line: billing_core::Line {
                    component,
                    tier: u32::try_from(tier).unwrap_or(0),
                    volume_m3,
                    unit_price,
                    amount,
                },
                kind: LineKind::Charge,
                from: from.unwrap_or(Date::MIN),
                to: to.unwrap_or(Date::MIN),
                tariff_version: version.unwrap_or_default(),
            },
        )
        .collect())
}

/// Overdue debt of one meter's account, as reported by the revenue system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Arrears {
    /// The meter.
    pub meter_id: String,
    /// The customer account in the revenue system.
    pub account_id: String,
    /// Yuan overdue; 0 means paid (the record is cleared).
    pub amount_overdue: Decimal,
    /// First day of the oldest unpaid bill's overdue period.
    pub overdue_since: Date,
    /// When the revenue system reported it.
    pub reported_at: OffsetDateTime,
}

/// Records the arrears of a meter reported by the revenue system (an API input); an amount of
/// 0 clears the record (payment). Audited with `actor`.
///
/// # Errors
/// [`BillingRunError::BadArrears`] for a negative amount or sub-fen precision; database errors.
pub async fn record_arrears(
    pool: &PgPool,
    arrears: &Arrears,
    actor: &str,
) -> Result<(), BillingRunError> {
    if arrears.amount_overdue.is_sign_negative() || arrears.amount_overdue.normalize().scale() > 2 {
        return Err(BillingRunError::BadArrears {
            meter: arrears.meter_id.clone(),
            reason: "amount must be a non-negative yuan amount with at most two decimals",
        });
    }
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    if arrears.amount_overdue.is_zero() {
        sqlx::query("DELETE FROM arrears WHERE meter_id = $1")
            .bind(&arrears.meter_id)
            .execute(&mut *tx)
            .await
            .map_err(db("clearing arrears"))?;
    } else {
        sqlx::query(
            "INSERT INTO arrears (meter_id, account_id, amount_overdue, overdue_since, reported_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (meter_id) DO UPDATE SET account_id = EXCLUDED.account_id,
                 amount_overdue = EXCLUDED.amount_overdue, overdue_since = EXCLUDED.overdue_since,
                 reported_at = EXCLUDED.reported_at, updated_at = now()",
        )
        .bind(&arrears.meter_id)
        .bind(&arrears.account_id)
        .bind(arrears.amount_overdue)
        .bind(arrears.overdue_since)
        .bind(arrears.reported_at)
        .execute(&mut *tx)
        .await
        .map_err(db("recording arrears"))?;
    }
    let action = if arrears.amount_overdue.is_zero() {
        "arrears.clear"
    } else {
        "arrears.record"
    };
    audit(
        &mut *tx,
        actor,
        action,
        "meter",
        &arrears.meter_id,
        serde_json::json!({
            "account_id": arrears.account_id,
            "amount_overdue": arrears.amount_overdue,
            "overdue_since": arrears.overdue_since.to_string(),
        }),
    )
    .await?;
    tx.commit().await.map_err(db("committing arrears"))?;
    Ok(())
}

/// The standing arrears of `meter`, if any.
///
/// # Errors
/// Database errors.
pub async fn arrears_of(pool: &PgPool, meter: &str) -> Result<Option<Arrears>, BillingRunError> {
    let row: Option<(String, String, Decimal, Date, OffsetDateTime)> = sqlx::query_as(
        "SELECT meter_id, account_id, amount_overdue, overdue_since, reported_at FROM arrears WHERE meter_id = $1",
    )
    .bind(meter)
    .fetch_optional(pool)
    .await
    .map_err(db("reading arrears"))?;
    Ok(row.map(
        |(meter_id, account_id, amount_overdue, overdue_since, reported_at)| Arrears {
            meter_id,
            account_id,
            amount_overdue,
            overdue_since,
            reported_at,
        },
    ))
}

/// A meter in arrears, with what the valve policy needs to decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArrearsStatus {
    /// The arrears record.
    pub arrears: Arrears,
    /// Days overdue on `as_of`.
    pub days_overdue: i64,
    /// The meter has a valve.
    pub has_valve: bool,
    /// Never valve-closed for arrears (medical, elderly alone).
    pub protected_customer: bool,
}

/// Meters owing at least `min_amount` for at least `min_days` on `as_of`: the input of the
/// valve-control policy (which also checks notices, working hours and protection).
///
/// # Errors
/// Database errors.
pub async fn meters_in_arrears(
    pool: &PgPool,
    as_of: Date,
    min_amount: Decimal,
    min_days: i64,
) -> Result<Vec<ArrearsStatus>, BillingRunError> {
    let cutoff = as_of - Duration::days(min_days);
    type Row = (String, String, Decimal, Date, OffsetDateTime, bool, bool);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT a.meter_id, a.account_id, a.amount_overdue, a.overdue_since, a.reported_at,
                m.has_valve, m.protected_customer
         FROM arrears a JOIN meters m ON m.meter_id = a.meter_id
         WHERE a.amount_overdue >= $1 AND a.overdue_since <= $2
         ORDER BY a.overdue_since, a.meter_id",
    )
    .bind(min_amount)
    .bind(cutoff)
    .fetch_all(pool)
    .await
    .map_err(db("listing arrears"))?;
    Ok(rows
        .into_iter()
        .map(
            |(
                meter_id,
                account_id,
                amount_overdue,
                overdue_since,
                reported_at,
                has_valve,
                protected_customer,
            )| {
                ArrearsStatus {
                    days_overdue: (as_of - overdue_since).whole_days(),
                    arrears: Arrears {
                        meter_id,
                        account_id,
                        amount_overdue,
                        overdue_since,
                        reported_at,
                    },
                    has_valve,
                    protected_customer,
                }
            },
        )
        .collect())
}
