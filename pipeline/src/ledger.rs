//! The read completeness ledger: per meter book and cycle, how many reads each meter should have
//! sent (from its registry read interval) against how many arrived, were validated, estimated,
//! rejected or are missing; and per gateway and source, how many reads arrived and how late.
//!
//! It turns "nothing is lost" into numbers a billing clerk can check before a bill run: a book is
//! complete when every meter has a billable end read and the missing share stays under a limit.

use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use time::{Date, OffsetDateTime, UtcOffset};

/// Errors of the ledger queries.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The cycle's end is not after its start.
    #[error("cycle {from}..{to} is empty: the end (exclusive) must be after the start")]
    EmptyCycle {
        /// First day.
        from: Date,
        /// Day after the last day.
        to: Date,
    },
    /// No meter of the book is in service during the cycle.
    #[error("meter book {0:?} has no meter in service during the cycle")]
    UnknownBook(String),
    /// The database refused a query.
    #[error("ledger query ({what}) failed: {source}")]
    Database {
        /// Which query.
        what: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> LedgerError {
    move |source| LedgerError::Database { what, source }
}

/// How long before the end boundary a billable read still closes a cycle; the bill run's rule.
pub const END_READ_WINDOW_DAYS: i64 = 7;

/// One meter's line of the ledger. Counts are of read slots (one per read interval), so jitter
/// and duplicates of one scheduled read count once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct MeterLedger {
    /// The meter.
    pub meter_id: String,
    /// Seconds between scheduled reads (registry `meters.read_interval_s`).
    pub read_interval_s: i32,
    /// Slots in the part of the cycle the meter was in service.
    pub expected: i64,
    /// Slots with a read from the meter (any quality but estimated).
    pub received: i64,
    /// Slots whose read passed VEE (`validated` or `edited`).
    pub validated: i64,
    /// Slots with only an estimate.
    pub estimated: i64,
    /// Slots whose read VEE refused.
    pub rejected: i64,
    /// Slots with nothing: expected − received − estimated, at least 0.
    pub missing: i64,
    /// Whether the bill run will find a billable end read (at or before the end boundary,
    /// within [`END_READ_WINDOW_DAYS`]).
    pub has_end_read: bool,
}

/// The ledger of one book and cycle.
#[derive(Debug, Clone, Serialize)]
pub struct BookLedger {
    /// The book.
    pub meter_book: String,
    /// First day (local).
    pub period_start: Date,
    /// Day after the last day (local).
    pub period_end: Date,
    /// One line per meter in service, by meter id.
    pub meters: Vec<MeterLedger>,
    /// Sum of `expected`.
    pub expected: i64,
    /// Sum of `received`.
    pub received: i64,
    /// Sum of `validated`.
    pub validated: i64,
    /// Sum of `estimated`.
    pub estimated: i64,
    /// Sum of `rejected`.
    pub rejected: i64,
    /// Sum of `missing`.
    pub missing: i64,
    /// `missing / expected` (0 when nothing is expected).
    pub missing_share: Decimal,
    /// Whether the book may be billed: every meter has an end read and the missing share is at
    /// most the limit asked for.
    pub complete: bool,
    /// Why not, one line per reason (empty when complete).
    pub incomplete_because: Vec<String>,
}

/// Computes the ledger of `book` for the local days `from..to` (exclusive) in `utc_offset`;
/// `max_missing_share` is the share of missing slots the book may have and still be complete.
pub async fn book_ledger(
    pool: &PgPool,
    book: &str,
    from: Date,
    to: Date,
    utc_offset: UtcOffset,
    max_missing_share: Decimal,
) -> Result<BookLedger, LedgerError> {
    if to <= from {
        return Err(LedgerError::EmptyCycle { from, to });
    }
    let start = from.midnight().assume_offset(utc_offset);
    let end = to.midnight().assume_offset(utc_offset);
    // Slots are counted from the meter's own in-service start, so a meter installed mid-cycle
    // expects only the reads of its days.
    let meters: Vec<MeterLedger> = sqlx::query_as(
        "WITH m AS (
             SELECT meter_id, read_interval_s,
                    greatest($2::timestamptz, coalesce(installed_at, $2)) AS w_start,
                    least($3::timestamptz, coalesce(retired_at, $3)) AS w_end
             FROM meters
             WHERE meter_book = $1 AND (installed_at IS NULL OR installed_at < $3)
               AND (retired_at IS NULL OR retired_at > $2)
         ),
         slots AS (
             SELECT r.meter_id,
                    floor(extract(epoch FROM r.ts - m.w_start) / m.read_interval_s)::bigint AS slot,
                    bool_or(r.quality <> 'estimated') AS has_read,
                    bool_or(r.quality IN ('validated', 'edited')) AS has_valid,
                    bool_or(r.quality = 'rejected') AS has_rejected
             FROM readings r JOIN m USING (meter_id)
             WHERE r.quantity = 'volume' AND r.ts >= m.w_start AND r.ts < m.w_end
               AND NOT ('superseded' = ANY (r.flags))
             GROUP BY 1, 2
         )
         SELECT m.meter_id, m.read_interval_s,
                greatest(0, floor(extract(epoch FROM m.w_end - m.w_start) / m.read_interval_s))::bigint AS expected,
                count(s.slot) FILTER (WHERE s.has_read) AS received,
                count(s.slot) FILTER (WHERE s.has_valid) AS validated,
                count(s.slot) FILTER (WHERE NOT s.has_read) AS estimated,
                count(s.slot) FILTER (WHERE s.has_rejected AND NOT s.has_valid) AS rejected,
                greatest(0, floor(extract(epoch FROM m.w_end - m.w_start) / m.read_interval_s)::bigint
                            - count(s.slot))::bigint AS missing,
                EXISTS (SELECT 1 FROM readings e
                        WHERE e.meter_id = m.meter_id AND e.quantity = 'volume'
                          AND e.ts <= $3 AND e.ts > $3::timestamptz - make_interval(days => $4)
                          AND e.quality IN ('validated', 'estimated', 'edited')
                          AND NOT ('superseded' = ANY (e.flags))) AS has_end_read
         FROM m LEFT JOIN slots s USING (meter_id)
         GROUP BY m.meter_id, m.read_interval_s, m.w_start, m.w_end
         ORDER BY m.meter_id",
    )
    .bind(book)
    .bind(start)
    .bind(end)
    .bind(END_READ_WINDOW_DAYS as i32)
    .fetch_all(pool)
    .await
    .map_err(db("meters of the book"))?;
    if meters.is_empty() {
        return Err(LedgerError::UnknownBook(book.to_owned()));
    }
    Ok(summarise(book, from, to, meters, max_missing_share))
}

fn summarise(
    book: &str,
    from: Date,
    to: Date,
    meters: Vec<MeterLedger>,
    max_missing_share: Decimal,
) -> BookLedger {
    let sum = |f: fn(&MeterLedger) -> i64| meters.iter().map(f).sum::<i64>();
    let expected = sum(|m| m.expected);
    let missing = sum(|m| m.missing);
    let missing_share = if expected == 0 {
        Decimal::ZERO
    } else {
        (Decimal::from(missing) / Decimal::from(expected)).round_dp(4)
    };
    let mut incomplete_because = Vec::new();
    let without_end: Vec<&str> = meters
        .iter()
        .filter(|m| !m.has_end_read)
        .map(|m| m.meter_id.as_str())
        .collect();
    if !without_end.is_empty() {
        let shown = without_end.len().min(10);
        incomplete_because.push(format!(
            "{} meter(s) without a billable end read: {}{}",
            without_end.len(),
            without_end[..shown].join(", "),
            if without_end.len() > shown {
                ", …"
            } else {
                ""
            }
        ));
    }
    if missing_share > max_missing_share {
        incomplete_because.push(format!(
            "missing share {missing_share} above the limit {max_missing_share} ({missing} of {expected} reads)"
        ));
    }
    BookLedger {
        meter_book: book.to_owned(),
        period_start: from,
        period_end: to,
        expected,
        received: sum(|m| m.received),
        validated: sum(|m| m.validated),
        estimated: sum(|m| m.estimated),
        rejected: sum(|m| m.rejected),
        missing,
        missing_share,
        complete: incomplete_because.is_empty(),
        incomplete_because,
        meters,
    }
}

/// Reads that arrived through one gateway and source in a window, and how late.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct SourceLedger {
    /// Gateway id (`-` for reads without one, e.g. manual reads).
    pub gateway_id: String,
    /// Source kind (`coap`, `mqtt`, `mbus`, …).
    pub source: String,
    /// Meters heard.
    pub meters: i64,
    /// Reads stored.
    pub reads: i64,
    /// Median seconds from the read's time to its arrival at the gateway.
    pub lag_p50_s: f64,
    /// 95th percentile of the same.
    pub lag_p95_s: f64,
    /// Largest lag.
    pub lag_max_s: f64,
}

/// Reads received in `[since, until)` per gateway and source, with their lag.
pub async fn source_ledger(
    pool: &PgPool,
    since: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<Vec<SourceLedger>, LedgerError> {
    sqlx::query_as(
        "SELECT coalesce(gateway_id, '-') AS gateway_id, source,
                count(DISTINCT meter_id) AS meters, count(*) AS reads,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY lag)::float8 AS lag_p50_s,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY lag)::float8 AS lag_p95_s,
                max(lag)::float8 AS lag_max_s
         FROM (SELECT gateway_id, source, meter_id,
                      greatest(0, extract(epoch FROM received_at - ts)) AS lag
               FROM readings WHERE received_at >= $1 AND received_at < $2
                 AND quality <> 'estimated') r
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(since)
    .bind(until)
    .fetch_all(pool)
    .await
    .map_err(db("reads per gateway and source"))
}

/// A gauge of the source ledger: name, help text, value of a row.
type Gauge = (&'static str, &'static str, fn(&SourceLedger) -> f64);

/// The source ledger as Prometheus text (gauges labelled by gateway and source).
pub fn source_ledger_prometheus(rows: &[SourceLedger]) -> String {
    let mut out = String::new();
    let gauges: [Gauge; 5] = [
        ("wm_ledger_reads", "Reads stored in the window", |r| {
            r.reads as f64
        }),
        ("wm_ledger_meters", "Meters heard in the window", |r| {
            r.meters as f64
        }),
        (
            "wm_ledger_lag_p50_seconds",
            "Median read-to-arrival lag",
            |r| r.lag_p50_s,
        ),
        (
            "wm_ledger_lag_p95_seconds",
            "95th percentile read-to-arrival lag",
            |r| r.lag_p95_s,
        ),
        (
            "wm_ledger_lag_max_seconds",
            "Largest read-to-arrival lag",
            |r| r.lag_max_s,
        ),
    ];
    for (name, help, value) in gauges {
        out.push_str(&format!("# HELP {name} {help}.\n# TYPE {name} gauge\n"));
        for r in rows {
            out.push_str(&format!(
                "{name}{{gateway=\"{}\",source=\"{}\"}} {}\n",
                r.gateway_id.replace('"', "'"),
                r.source.replace('"', "'"),
                value(r)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn line(id: &str, expected: i64, received: i64, estimated: i64, end: bool) -> MeterLedger {
        MeterLedger {
            meter_id: id.into(),
            read_interval_s: 3600,
            expected,
            received,
            validated: received,
            estimated,
            rejected: 0,
            missing: (expected - received - estimated).max(0),
            has_end_read: end,
        }
    }

    #[test]
    fn a_book_is_complete_only_with_end_reads_and_few_missing() {
        let limit = Decimal::new(2, 2);
        let ok = summarise(
            "B",
            date!(2026 - 10 - 01),
            date!(2026 - 11 - 01),
            vec![line("a", 744, 740, 2, true), line("b", 744, 744, 0, true)],
            limit,
        );
        assert!(ok.complete, "{:?}", ok.incomplete_because);
        assert_eq!((ok.expected, ok.missing), (1488, 2));
        assert_eq!(ok.missing_share, Decimal::new(13, 4));

        let no_end = summarise(
            "B",
            date!(2026 - 10 - 01),
            date!(2026 - 11 - 01),
            vec![line("a", 744, 744, 0, false)],
            limit,
        );
        assert!(!no_end.complete);
        assert_eq!(
            no_end.incomplete_because,
            ["1 meter(s) without a billable end read: a"]
        );

        let gappy = summarise(
            "B",
            date!(2026 - 10 - 01),
            date!(2026 - 11 - 01),
            vec![line("a", 100, 90, 0, true)],
            limit,
        );
        assert_eq!(
            gappy.incomplete_because,
            ["missing share 0.10 above the limit 0.02 (10 of 100 reads)"]
        );
    }

    #[test]
    fn prometheus_text_labels_each_gateway_and_source() {
        let text = source_ledger_prometheus(&[SourceLedger {
            gateway_id: "gw-1".into(),
            source: "coap".into(),
            meters: 3,
            reads: 72,
            lag_p50_s: 3600.0,
            lag_p95_s: 80000.0,
            lag_max_s: 86000.0,
        }]);
        assert!(text.contains("wm_ledger_reads{gateway=\"gw-1\",source=\"coap\"} 72\n"));
        assert!(
            text.contains("wm_ledger_lag_p95_seconds{gateway=\"gw-1\",source=\"coap\"} 80000\n")
        );
        assert_eq!(text.matches("# TYPE").count(), 5);
    }
}
