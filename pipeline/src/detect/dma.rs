//! DMA water balance (`dma_imbalance`): daily inflow of a district metered area (its inlet
//! meters, less its outlet meters) against the sum of its customer meters.
//!
//! A DMA spans every worker's partitions, so this is not judged on a worker's batch: worker 0
//! runs [`run`] every hour over the daily rollups of the last [`LOOKBACK_DAYS`] complete local
//! days, and the judgement ([`judge`]) is pure and stateless: the open alarm in `alarms`
//! (meter `dma:<name>`) is the only state, so a crash or a second run can neither lose nor
//! repeat an alarm. Estimated customer consumption is counted as consumption (it is billed) but
//! reported apart in the alarm's detail; a day on which fewer than
//! [`DmaThresholds::min_coverage`] of the DMA's customer meters have a rollup is *unknown*: it
//! neither extends nor ends a run (a silent meter must not look like a loss).

use rust_decimal::prelude::ToPrimitive;
use sqlx::{Connection, PgPool};
use time::{Date, OffsetDateTime, UtcOffset};

use super::config::DmaThresholds;
use super::{AlarmEvent, Transition};
use crate::db::StoreError;
use model::{AlarmKind, AlarmSeverity};

/// Complete local days judged on every run.
pub const LOOKBACK_DAYS: i64 = 14;

/// One DMA's balance on one local day.
#[derive(Debug, Clone, PartialEq)]
pub struct DmaDay {
    /// The local day.
    pub day: Date,
    /// Inlet consumption less outlet consumption, m³.
    pub inflow_m3: f64,
    /// Customer consumption from actual reads, m³.
    pub customers_m3: f64,
    /// Customer consumption on days with estimated reads, m³.
    pub estimated_m3: f64,
    /// Customer meters with a rollup that day.
    pub customers_reporting: u32,
    /// Customer meters of the DMA.
    pub customers_total: u32,
}

impl DmaDay {
    /// Loss share of the inflow, `None` when the day cannot be judged (no inflow, or too few
    /// customer meters reported).
    pub fn loss_share(&self, t: &DmaThresholds) -> Option<f64> {
        if self.inflow_m3 <= 0.0 || self.customers_total == 0 {
            return None;
        }
        let coverage = f64::from(self.customers_reporting) / f64::from(self.customers_total);
        if coverage < t.min_coverage {
            return None;
        }
        Some((self.inflow_m3 - self.customers_m3 - self.estimated_m3) / self.inflow_m3)
    }
}

/// What the balance says about a DMA now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The loss share exceeded the threshold on the last `days.len()` judged days (at least
    /// [`DmaThresholds::days`]): the alarm should be open.
    Imbalance {
        /// First day of the run (the alarm's `first_seen` is its local midnight).
        first: Date,
        /// Last day of the run.
        last: Date,
        /// Loss share of the last day.
        share: f64,
        /// The last day's figures.
        latest: DmaDay,
    },
    /// The last judged day was within the threshold: the alarm should be closed.
    Balanced {
        /// That day.
        day: Date,
    },
    /// Nothing to judge (no day in the window could be judged, or the run is still shorter
    /// than the threshold): leave the alarm as it is.
    Unknown,
}

/// Judges one DMA's days (any order): the run of consecutive judged days over the threshold
/// that ends at the newest judged day. Unknown days are skipped (neither extend nor end a run);
/// a missing calendar day between two judged days ends it.
pub fn judge(days: &[DmaDay], t: &DmaThresholds) -> Verdict {
    let mut judged: Vec<(&DmaDay, f64)> = days
        .iter()
        .filter_map(|d| d.loss_share(t).map(|s| (d, s)))
        .collect();
    judged.sort_by_key(|(d, _)| d.day);
    let Some(&(newest, share)) = judged.last() else {
        return Verdict::Unknown;
    };
    if share <= t.loss_share {
        return Verdict::Balanced { day: newest.day };
    }
    let mut first = newest.day;
    let mut count = 1u32;
    for (d, s) in judged.iter().rev().skip(1) {
        if *s <= t.loss_share {
            break;
        }
        first = d.day;
        count += 1;
    }
    if count >= t.days {
        Verdict::Imbalance {
            first,
            last: newest.day,
            share,
            latest: newest.clone(),
        }
    } else {
        Verdict::Unknown
    }
}

/// The alarm event a verdict means given whether the DMA's alarm is open now.
pub fn event(
    dma: &str,
    verdict: &Verdict,
    open: bool,
    t: &DmaThresholds,
    offset: UtcOffset,
) -> Option<AlarmEvent> {
    let midnight = |d: Date| d.midnight().assume_offset(offset).unix_timestamp();
    let meter = format!("dma:{dma}");
    match verdict {
        Verdict::Imbalance {
            first,
            last,
            share,
            latest,
        } => {
            let severity = if *share >= 2.0 * t.loss_share {
                AlarmSeverity::Critical
            } else {
                AlarmSeverity::Warning
            };
            let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
            let detail = [
                ("rule", serde_json::json!("daily_water_balance")),
                ("loss_share", serde_json::json!(round3(*share))),
                ("threshold", serde_json::json!(t.loss_share)),
                ("inflow_m3", serde_json::json!(round3(latest.inflow_m3))),
                (
                    "customers_m3",
                    serde_json::json!(round3(latest.customers_m3)),
                ),
                (
                    "estimated_m3",
                    serde_json::json!(round3(latest.estimated_m3)),
                ),
                (
                    "customers_reporting",
                    serde_json::json!(latest.customers_reporting),
                ),
                ("customers_total", serde_json::json!(latest.customers_total)),
                ("day", serde_json::json!(last.to_string())),
            ];
            Some(AlarmEvent {
                meter,
                kind: AlarmKind::DmaImbalance,
                transition: if open {
                    Transition::Seen
                } else {
                    Transition::Raised
                },
                severity,
                first_seen: midnight(*first),
                at: midnight(last.next_day().unwrap_or(*last)),
                detail: if open {
                    serde_json::Map::new()
                } else {
                    detail.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                },
            })
        }
        Verdict::Balanced { day } if open => Some(AlarmEvent {
            meter,
            kind: AlarmKind::DmaImbalance,
            transition: Transition::Cleared,
            severity: AlarmSeverity::Info,
            first_seen: midnight(*day),
            at: midnight(day.next_day().unwrap_or(*day)),
            detail: serde_json::Map::new(),
        }),
        Verdict::Balanced { .. } | Verdict::Unknown => None,
    }
}

fn stage(stage: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Stage { stage, source }
}

/// Loads the daily balance of every DMA over `[from, to)` (local days of the rollups).
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn load_days(
    conn: &mut sqlx::PgConnection,
    from: Date,
    to: Date,
) -> Result<Vec<(String, DmaDay)>, StoreError> {
    type Row = (
        String,
        Date,
        rust_decimal::Decimal,
        rust_decimal::Decimal,
        rust_decimal::Decimal,
        i64,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "WITH totals AS (
             SELECT dma, count(*) AS customers FROM meters
             WHERE dma IS NOT NULL AND role = 'customer' GROUP BY dma)
         SELECT m.dma, d.bucket,
                coalesce(sum(d.consumption) FILTER (WHERE m.role = 'inlet'), 0)
                  - coalesce(sum(d.consumption) FILTER (WHERE m.role = 'outlet'), 0),
                coalesce(sum(d.consumption) FILTER (WHERE m.role = 'customer' AND NOT d.estimated), 0),
                coalesce(sum(d.consumption) FILTER (WHERE m.role = 'customer' AND d.estimated), 0),
                count(*) FILTER (WHERE m.role = 'customer'),
                coalesce(max(t.customers), 0)
         FROM rollup_daily d
         JOIN meters m ON m.meter_id = d.meter_id
         LEFT JOIN totals t ON t.dma = m.dma
         WHERE m.dma IS NOT NULL AND d.bucket >= $1 AND d.bucket < $2
         GROUP BY m.dma, d.bucket
         ORDER BY m.dma, d.bucket",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&mut *conn)
    .await
    .map_err(stage("loading the DMA balance"))?;
    Ok(rows
        .into_iter()
        .map(
            |(dma, day, inflow, customers, estimated, reporting, total)| {
                (
                    dma,
                    DmaDay {
                        day,
                        inflow_m3: inflow.to_f64().unwrap_or(0.0),
                        customers_m3: customers.to_f64().unwrap_or(0.0),
                        estimated_m3: estimated.to_f64().unwrap_or(0.0),
                        customers_reporting: u32::try_from(reporting).unwrap_or(0),
                        customers_total: u32::try_from(total).unwrap_or(0),
                    },
                )
            },
        )
        .collect())
}

/// Judges every DMA on the complete local days before `now` and writes the raises, refreshes
/// and clears to `alarms` in one transaction; returns the events (to publish).
///
/// # Errors
/// [`StoreError::Stage`] when a statement fails (nothing is written then).
pub async fn run(
    pool: &PgPool,
    t: &DmaThresholds,
    day_offset: UtcOffset,
    now: OffsetDateTime,
) -> Result<Vec<AlarmEvent>, StoreError> {
    let today = now.to_offset(day_offset).date();
    let from = today - time::Duration::days(LOOKBACK_DAYS);
    let mut conn = pool
        .acquire()
        .await
        .map_err(stage("acquiring a connection"))?;
    let mut tx = conn.begin().await.map_err(stage("beginning"))?;
    // One judge at a time: two runs (a restarted worker 0 beside the old one) would otherwise
    // both raise. Released at commit.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('wm_dma_balance'))")
        .execute(&mut *tx)
        .await
        .map_err(stage("locking the DMA balance"))?;
    let days = load_days(&mut tx, from, today).await?;
    let open: Vec<String> = sqlx::query_scalar(
        "SELECT meter_id FROM alarms WHERE kind = 'dma_imbalance' AND cleared_at IS NULL",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(stage("loading open DMA alarms"))?;
    let mut events = Vec::new();
    let mut i = 0;
    while i < days.len() {
        let dma = days[i].0.clone();
        let mut j = i;
        while j < days.len() && days[j].0 == dma {
            j += 1;
        }
        let series: Vec<DmaDay> = days[i..j].iter().map(|(_, d)| d.clone()).collect();
        let is_open = open.iter().any(|m| *m == format!("dma:{dma}"));
        if let Some(e) = event(&dma, &judge(&series, t), is_open, t, day_offset) {
            events.push(e);
        }
        i = j;
    }
    super::store::write(
        &mut tx,
        &super::store::AlarmWrite {
            events: events.clone(),
            states: Vec::new(),
        },
    )
    .await?;
    tx.commit().await.map_err(stage("committing"))?;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn day(d: Date, inflow: f64, customers: f64, reporting: u32) -> DmaDay {
        DmaDay {
            day: d,
            inflow_m3: inflow,
            customers_m3: customers,
            estimated_m3: 0.0,
            customers_reporting: reporting,
            customers_total: 100,
        }
    }

    #[test]
    fn verdicts_table() {
        let t = DmaThresholds::default(); // 12 %, 2 days, 95 % coverage
        let d1 = date!(2026 - 03 - 01);
        let d2 = date!(2026 - 03 - 02);
        let d3 = date!(2026 - 03 - 03);
        let cases: Vec<(&str, Vec<DmaDay>, Verdict)> = vec![
            ("nothing", vec![], Verdict::Unknown),
            (
                "balanced",
                vec![day(d1, 100.0, 95.0, 100)],
                Verdict::Balanced { day: d1 },
            ),
            (
                "one lossy day is not enough",
                vec![day(d1, 100.0, 95.0, 100), day(d2, 100.0, 80.0, 100)],
                Verdict::Unknown,
            ),
            (
                "two lossy days",
                vec![day(d2, 100.0, 80.0, 100), day(d1, 100.0, 85.0, 100)],
                Verdict::Imbalance {
                    first: d1,
                    last: d2,
                    share: 0.2,
                    latest: day(d2, 100.0, 80.0, 100),
                },
            ),
            (
                "a day with too few customers reporting is skipped, not a loss",
                vec![
                    day(d1, 100.0, 95.0, 100),
                    day(d2, 100.0, 50.0, 60),
                    day(d3, 100.0, 96.0, 100),
                ],
                Verdict::Balanced { day: d3 },
            ),
            (
                "an unknown day between two lossy days does not end the run",
                vec![
                    day(d1, 100.0, 80.0, 100),
                    day(d2, 0.0, 50.0, 100),
                    day(d3, 100.0, 70.0, 100),
                ],
                Verdict::Imbalance {
                    first: d1,
                    last: d3,
                    share: 0.3,
                    latest: day(d3, 100.0, 70.0, 100),
                },
            ),
            (
                "recovered",
                vec![
                    day(d1, 100.0, 80.0, 100),
                    day(d2, 100.0, 80.0, 100),
                    day(d3, 100.0, 90.0, 100),
                ],
                Verdict::Balanced { day: d3 },
            ),
        ];
        for (name, days, want) in cases {
            let got = judge(&days, &t);
            match (&got, &want) {
                (
                    Verdict::Imbalance {
                        first: f1,
                        last: l1,
                        share: s1,
                        ..
                    },
                    Verdict::Imbalance {
                        first: f2,
                        last: l2,
                        share: s2,
                        ..
                    },
                ) => {
                    assert_eq!((f1, l1), (f2, l2), "{name}");
                    assert!((s1 - s2).abs() < 1e-9, "{name}: {s1} vs {s2}");
                }
                _ => assert_eq!(got, want, "{name}"),
            }
        }
    }

    #[test]
    fn estimated_consumption_counts_as_consumption_but_is_reported_apart() {
        let t = DmaThresholds::default();
        let mut d = day(date!(2026 - 03 - 01), 100.0, 60.0, 100);
        d.estimated_m3 = 35.0;
        assert!((d.loss_share(&t).unwrap() - 0.05).abs() < 1e-9);
        let days = vec![
            day(date!(2026 - 02 - 28), 100.0, 70.0, 100),
            DmaDay {
                estimated_m3: 5.0,
                ..day(date!(2026 - 03 - 01), 100.0, 70.0, 100)
            },
        ];
        let v = judge(&days, &t);
        let e = event("north", &v, false, &t, UtcOffset::UTC).unwrap();
        assert_eq!(e.meter, "dma:north");
        assert_eq!(e.transition, Transition::Raised);
        assert_eq!(e.severity, AlarmSeverity::Critical); // 25 % ≥ 2 × 12 %
        assert_eq!(e.detail["estimated_m3"], serde_json::json!(5.0));
        assert_eq!(
            e.first_seen,
            date!(2026 - 02 - 28)
                .midnight()
                .assume_utc()
                .unix_timestamp()
        );
        // Open already: a refresh; balanced while open: a clear; balanced while closed: nothing.
        assert_eq!(
            event("north", &v, true, &t, UtcOffset::UTC)
                .unwrap()
                .transition,
            Transition::Seen
        );
        let ok = Verdict::Balanced {
            day: date!(2026 - 03 - 02),
        };
        assert_eq!(
            event("north", &ok, true, &t, UtcOffset::UTC)
                .unwrap()
                .transition,
            Transition::Cleared
        );
        assert_eq!(event("north", &ok, false, &t, UtcOffset::UTC), None);
    }
}
