//! Bills from register reads: usage across rollover and meter replacement, the tariff-year tier
//! position, proration by days when a tariff changes inside the cycle, estimated bills, and the
//! adjustment lines that true a bill up when a corrected (or actual) read arrives.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use time::{Date, Month, OffsetDateTime};

use crate::quote::{BillingError, Line, MAX_VOLUME, QuoteRequest, price_class, total_of};
use crate::tariff::{TariffBook, TierPeriod};

// Dates as `YYYY-MM-DD` in stored bill inputs (the default serde form is a tuple).
time::serde::format_description!(iso_date, Date, "[year]-[month]-[day]");

/// Volume precision of prorated segment usage, m3 (one litre, the register resolution of
/// household meters).
pub const SEGMENT_VOLUME_SCALE: u32 = 3;

/// Share of the register capacity a rollover may account for: a decrease is a rollover only if
/// `capacity − start + end` stays below `capacity / ROLLOVER_MAX_SHARE_DIVISOR`; anything larger is
/// reverse flow or a wrong read and is refused.
pub const ROLLOVER_MAX_SHARE_DIVISOR: u32 = 10;

/// A register read used at a cycle boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRead {
    /// Measurement time.
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    /// Register value, m3.
    pub value: Decimal,
    /// The read is an estimate (the bill is then estimated and trued up later).
    pub estimated: bool,
}

/// A recorded meter replacement inside a cycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    /// When the meter was swapped.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Final register value of the old meter.
    pub old_final: Decimal,
    /// Initial register value of the new meter.
    pub new_initial: Decimal,
}

/// Usage over a cycle and how it was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// m3.
    pub total: Decimal,
    /// A register rolled over at its capacity.
    pub rollover: bool,
    /// A meter replacement was bridged.
    pub replaced: bool,
}

fn register_delta(
    from: Decimal,
    to: Decimal,
    capacity: Decimal,
) -> Result<(Decimal, bool), BillingError> {
    for value in [from, to] {
        if value.is_sign_negative() || value >= capacity {
            return Err(BillingError::BeyondCapacity { value, capacity });
        }
    }
    if to >= from {
        return Ok((to - from, false));
    }
    let wrapped = capacity - from + to;
    if wrapped * Decimal::from(ROLLOVER_MAX_SHARE_DIVISOR) > capacity {
        return Err(BillingError::RegisterDecreased { from, to });
    }
    Ok((wrapped, true))
}

/// Usage between two reads of a register with `capacity` (the value at which it wraps to 0),
/// bridging `replacement` when it happened after `start` and at or before `end`:
/// `(old_final − start) + (end − new_initial)`.
///
/// # Errors
/// [`BillingError::BeyondCapacity`], [`BillingError::RegisterDecreased`] or
/// [`BillingError::BadPeriod`] when the end read is before the start read.
pub fn register_usage(
    start: &RegisterRead,
    end: &RegisterRead,
    capacity: Decimal,
    replacement: Option<&Replacement>,
) -> Result<Usage, BillingError> {
    if end.ts < start.ts {
        return Err(BillingError::BadPeriod(format!(
            "end read {} is before start read {}",
            end.ts, start.ts
        )));
    }
    if capacity <= Decimal::ZERO || capacity > MAX_VOLUME {
        return Err(BillingError::OutOfRange {
            field: "capacity",
            value: capacity.to_string(),
            expected: "above 0, at most 1e9 m3",
        });
    }
    let usage = match replacement.filter(|r| r.at > start.ts && r.at <= end.ts) {
        Some(r) => {
            let (old, rolled_old) = register_delta(start.value, r.old_final, capacity)?;
            let (new, rolled_new) = register_delta(r.new_initial, end.value, capacity)?;
            Usage {
                total: old + new,
                rollover: rolled_old || rolled_new,
                replaced: true,
            }
        }
        None => {
            let (total, rollover) = register_delta(start.value, end.value, capacity)?;
            Usage {
                total,
                rollover,
                replaced: false,
            }
        }
    };
    Ok(usage)
}

/// Everything a bill is computed from; stored with the bill so it can be reproduced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillRequest {
    /// Meter id.
    pub meter: String,
    /// Customer class id.
    pub class: String,
    /// Persons in the household.
    pub persons: u32,
    /// Township customer.
    pub township: bool,
    /// First day of the cycle.
    #[serde(with = "iso_date")]
    pub period_start: Date,
    /// Day after the last day of the cycle (exclusive).
    #[serde(with = "iso_date")]
    pub period_end: Date,
    /// Read at the start of the cycle.
    pub start: RegisterRead,
    /// Read at the end of the cycle.
    pub end: RegisterRead,
    /// Register capacity (rollover point), m3.
    pub capacity: Decimal,
    /// Meter replacement inside the cycle, if any.
    pub replacement: Option<Replacement>,
    /// Usage billed earlier in the same tariff year (used by annual tiers).
    pub year_usage_before: Decimal,
}

/// A part of the cycle priced with one tariff version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// First day.
    #[serde(with = "iso_date")]
    pub from: Date,
    /// Day after the last day.
    #[serde(with = "iso_date")]
    pub to: Date,
    /// Days in the segment.
    pub days: i64,
    /// Usage allocated to it by days, m3.
    pub usage: Decimal,
    /// Tier position before it (tier-period usage so far).
    pub usage_before: Decimal,
    /// Tier periods the tier volumes are scaled by (monthly tiers on multi-month cycles).
    pub tier_scale: Decimal,
    /// Name of the tariff used.
    pub tariff_name: String,
    /// Version of the tariff used.
    pub tariff_version: String,
}

/// Whether a line charges or reverses an earlier charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// A charge of this bill.
    Charge,
    /// The negation of a charge of the bill being adjusted.
    Reversal,
}

impl LineKind {
    /// Name stored in `bill_lines.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Reversal => "reversal",
        }
    }
}

/// A bill line with the segment and tariff version it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BillLine {
    /// The priced line.
    #[serde(flatten)]
    pub line: Line,
    /// Charge or reversal.
    pub kind: LineKind,
    /// First day of the segment.
    #[serde(with = "iso_date")]
    pub from: Date,
    /// Day after the last day of the segment.
    #[serde(with = "iso_date")]
    pub to: Date,
    /// Tariff version used.
    pub tariff_version: String,
}

/// A computed bill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bill {
    /// The inputs.
    pub request: BillRequest,
    /// Usage over the cycle.
    pub usage: Usage,
    /// Billed on an estimated read.
    pub estimated: bool,
    /// Parts of the cycle by tariff version (one unless a tariff changed inside the cycle).
    pub segments: Vec<Segment>,
    /// Lines of every segment.
    pub lines: Vec<BillLine>,
    /// Sum of the lines.
    pub total: Decimal,
}

impl Bill {
    /// Tariff versions used, comma-separated in segment order.
    pub fn tariff_version(&self) -> String {
        join_unique(self.segments.iter().map(|s| s.tariff_version.as_str()))
    }

    /// SHA-256 (hex) of everything the bill stands on: the request (reads, household, tier
    /// position, replacement) and the tariff versions. Equal fingerprints mean a rerun would
    /// produce the same bill.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        // Serialising plain structs with string map keys cannot fail.
        let basis = serde_json::to_vec(&(&self.request, self.tariff_version())).unwrap_or_default();
        let digest = Sha256::digest(&basis);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Tariff names used, comma-separated in segment order.
    pub fn tariff_name(&self) -> String {
        join_unique(self.segments.iter().map(|s| s.tariff_name.as_str()))
    }
}

fn join_unique<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out: Vec<&str> = Vec::new();
    for i in items {
        if out.last() != Some(&i) {
            out.push(i);
        }
    }
    out.join(",")
}

/// Tier periods in a cycle for monthly tiers: whole months when the cycle runs from a day of
/// the month to the same day of a later month (a calendar month counts 1 whatever its length),
/// otherwise days / 30 to four decimals.
pub fn month_scale(from: Date, to: Date) -> Decimal {
    if from.day() == to.day() {
        let months = (i64::from(to.year()) * 12 + i64::from(u8::from(to.month())))
            - (i64::from(from.year()) * 12 + i64::from(u8::from(from.month())));
        if months > 0 {
            return Decimal::from(months);
        }
    }
    (Decimal::from((to - from).whole_days()) / Decimal::from(30))
        .round_dp_with_strategy(4, RoundingStrategy::MidpointAwayFromZero)
}

fn new_years_within(from: Date, to: Date) -> Vec<Date> {
    ((from.year() + 1)..=to.year())
        .filter_map(|y| Date::from_calendar_date(y, Month::January, 1).ok())
        .filter(|d| *d > from && *d < to)
        .collect()
}

/// Computes the bill of one meter for one cycle.
///
/// The cycle is cut where a tariff version for the class takes effect and, for annual tiers, at
/// 1 January (the tier position restarts at 0). Usage is allocated to the parts by days; each
/// part is priced with its tariff, continuing the tier position of the parts before it. Fixed
/// charges are prorated by days. Each line is rounded once to the fen; the total is their sum.
///
/// # Errors
/// [`BillingError`] for bad reads, a bad period or a missing tariff.
pub fn compute_bill(book: &TariffBook, req: &BillRequest) -> Result<Bill, BillingError> {
    if req.period_end <= req.period_start {
        return Err(BillingError::BadPeriod(format!(
            "period end {} is not after period start {}",
            req.period_end, req.period_start
        )));
    }
    let usage = register_usage(&req.start, &req.end, req.capacity, req.replacement.as_ref())?;
    let mut cuts = book.changes_within(&req.class, req.period_start, req.period_end);
    for ny in new_years_within(req.period_start, req.period_end) {
        let annual_before = ny
            .previous_day()
            .and_then(|d| book.lookup(&req.class, d).ok())
            .is_some_and(|(t, _)| t.tier_period == TierPeriod::Year);
        let annual_after = book
            .lookup(&req.class, ny)
            .is_ok_and(|(t, _)| t.tier_period == TierPeriod::Year);
        if annual_before || annual_after {
            cuts.push(ny);
        }
    }
    cuts.sort();
    cuts.dedup();
    let mut bounds = Vec::with_capacity(cuts.len() + 2);
    bounds.push(req.period_start);
    bounds.extend(cuts);
    bounds.push(req.period_end);

    let total_days = (req.period_end - req.period_start).whole_days();
    let cycle_scale = month_scale(req.period_start, req.period_end);
    let mut segments = Vec::new();
    let mut lines = Vec::new();
    let mut allocated = Decimal::ZERO;
    let mut year_before = req.year_usage_before;
    let mut cycle_before = Decimal::ZERO;
    for (from, to) in bounds.iter().zip(bounds.iter().skip(1)) {
        let (from, to) = (*from, *to);
        let (tariff, class) = book.lookup(&req.class, from)?;
        let days = (to - from).whole_days();
        let cum_days = (to - req.period_start).whole_days();
        // Cumulative allocation: parts never go negative and always add up to the usage.
        let cum = if to == req.period_end {
            usage.total
        } else {
            (usage.total * Decimal::from(cum_days) / Decimal::from(total_days))
                .round_dp_with_strategy(
                    SEGMENT_VOLUME_SCALE,
                    RoundingStrategy::MidpointAwayFromZero,
                )
                .min(usage.total)
        };
        let part = (cum - allocated).max(Decimal::ZERO);
        allocated = cum;
        if from != req.period_start && from.month() == Month::January && from.day() == 1 {
            year_before = Decimal::ZERO;
        }
        let (usage_before, tier_scale) = match tariff.tier_period {
            TierPeriod::Year => (year_before, Decimal::ONE),
            TierPeriod::Month => (cycle_before, cycle_scale),
        };
        let quote_req = QuoteRequest {
            class: req.class.clone(),
            persons: req.persons,
            usage_before,
            usage: part,
            township: req.township,
            tier_scale,
            fixed_share: Decimal::from(days) / Decimal::from(total_days),
        };
        for line in price_class(class, &quote_req)? {
            lines.push(BillLine {
                line,
                kind: LineKind::Charge,
                from,
                to,
                tariff_version: tariff.version.clone(),
            });
        }
        segments.push(Segment {
            from,
            to,
            days,
            usage: part.normalize(),
            usage_before: usage_before.normalize(),
            tier_scale,
            tariff_name: tariff.name.clone(),
            tariff_version: tariff.version.clone(),
        });
        year_before += part;
        cycle_before += part;
    }
    let total = total_of(lines.iter().map(|l| &l.line));
    Ok(Bill {
        estimated: req.start.estimated || req.end.estimated,
        request: req.clone(),
        usage,
        segments,
        lines,
        total,
    })
}

/// Lines of an adjustment bill: every charge line of the bill being corrected, negated
/// (`reversal`), then the corrected charges. Their sum is `corrected − previous`, and each
/// amount is an already rounded line, so nothing is rounded twice.
pub fn adjustment_lines(previous: &[BillLine], corrected: &[BillLine]) -> Vec<BillLine> {
    let reversals = previous
        .iter()
        .filter(|l| l.kind == LineKind::Charge)
        .map(|l| BillLine {
            line: Line {
                component: l.line.component.clone(),
                tier: l.line.tier,
                volume_m3: -l.line.volume_m3,
                unit_price: l.line.unit_price,
                amount: -l.line.amount,
            },
            kind: LineKind::Reversal,
            from: l.from,
            to: l.to,
            tariff_version: l.tariff_version.clone(),
        });
    reversals
        .chain(
            corrected
                .iter()
                .filter(|l| l.kind == LineKind::Charge)
                .cloned(),
        )
        .collect()
}

/// Sum of bill line amounts.
pub fn bill_total(lines: &[BillLine]) -> Decimal {
    total_of(lines.iter().map(|l| &l.line))
}
