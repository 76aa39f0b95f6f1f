//! Pricing one usage against one tariff version: lines per tier and component, each rounded
//! once to the fen (half-up), and the total as the sum of the rounded lines.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;

use crate::tariff::{Class, TariffBook, TariffError, TariffStatus, TierPeriod};

/// Largest usage or cumulative usage accepted, m3: keeps every product far inside `Decimal`'s
/// 28 digits, so the arithmetic below cannot overflow.
pub const MAX_VOLUME: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);
/// Largest household accepted.
pub const MAX_PERSONS: u32 = 1000;

/// Rounds an amount once to the fen, half-up (away from zero at .5 fen), as DOMAIN.md and
/// Chinese billing practice require; the result always has two decimals.
pub fn to_fen(amount: Decimal) -> Decimal {
    let mut r = amount.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    r.rescale(2);
    r
}

/// One line of a quote or bill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    /// `water`, `sewage`, `resource`, or `fixed:<name>` for a fixed charge.
    pub component: String,
    /// Tier number from 1; 0 for fixed charges.
    pub tier: u32,
    /// Volume in m3 (0 for fixed charges).
    pub volume_m3: Decimal,
    /// Yuan per m3 (the charge itself for fixed charges).
    pub unit_price: Decimal,
    /// Yuan, rounded once to the fen.
    pub amount: Decimal,
}

/// What to price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteRequest {
    /// Customer class id.
    pub class: String,
    /// Persons in the household (tier bounds grow above the class's base size).
    pub persons: u32,
    /// Usage already billed earlier in the same tier period (the tariff year for annual tiers).
    pub usage_before: Decimal,
    /// Usage to price, m3.
    pub usage: Decimal,
    /// Township customer: the class's township prices replace the tier prices.
    pub township: bool,
    /// Tier periods covered (1 for a monthly bill on monthly tiers, 2 for a two-month bill).
    pub tier_scale: Decimal,
    /// Share of the fixed charges to include (1 for a whole bill, 0 for none).
    pub fixed_share: Decimal,
}

impl QuoteRequest {
    /// A request for a whole bill of one tier period.
    pub fn new(
        class: impl Into<String>,
        persons: u32,
        usage_before: Decimal,
        usage: Decimal,
    ) -> Self {
        Self {
            class: class.into(),
            persons,
            usage_before,
            usage,
            township: false,
            tier_scale: Decimal::ONE,
            fixed_share: Decimal::ONE,
        }
    }
}

/// Why a quote or bill could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillingError {
    /// No usable tariff.
    #[error(transparent)]
    Tariff(#[from] TariffError),
    /// An input is outside what the engine accepts.
    #[error("{field} = {value} is out of range ({expected})")]
    OutOfRange {
        /// Input name.
        field: &'static str,
        /// Value given.
        value: String,
        /// Accepted range.
        expected: &'static str,
    },
    /// A register value is at or above the register's capacity.
    #[error("register value {value} is not below the register capacity {capacity}")]
    BeyondCapacity {
        /// The value.
        value: Decimal,
        /// The capacity.
        capacity: Decimal,
    },
    /// The register went down by more than a rollover explains (reverse flow or a wrong read).
    #[error("register decreased from {from} to {to} and no rollover or replacement explains it")]
    RegisterDecreased {
        /// Earlier value.
        from: Decimal,
        /// Later value.
        to: Decimal,
    },
    /// The end read is not after the start read, or the period is empty.
    #[error("bad period: {0}")]
    BadPeriod(String),
}

fn check_volume(field: &'static str, v: Decimal) -> Result<(), BillingError> {
    if v.is_sign_negative() || v > MAX_VOLUME {
        return Err(BillingError::OutOfRange {
            field,
            value: v.to_string(),
            expected: "0 to 1e9 m3",
        });
    }
    Ok(())
}

fn check_request(req: &QuoteRequest) -> Result<(), BillingError> {
    check_volume("usage", req.usage)?;
    check_volume("usage_before", req.usage_before)?;
    if req.persons == 0 || req.persons > MAX_PERSONS {
        return Err(BillingError::OutOfRange {
            field: "persons",
            value: req.persons.to_string(),
            expected: "1 to 1000",
        });
    }
    if req.tier_scale <= Decimal::ZERO || req.tier_scale > Decimal::from(1000) {
        return Err(BillingError::OutOfRange {
            field: "tier_scale",
            value: req.tier_scale.to_string(),
            expected: "above 0, at most 1000",
        });
    }
    if req.fixed_share.is_sign_negative() || req.fixed_share > Decimal::ONE {
        return Err(BillingError::OutOfRange {
            field: "fixed_share",
            value: req.fixed_share.to_string(),
            expected: "0 to 1",
        });
    }
    Ok(())
}

/// Volume of `[before, before + usage)` falling in each tier, for tier upper bounds `bounds`.
pub fn split_tiers(bounds: &[Option<Decimal>], before: Decimal, usage: Decimal) -> Vec<Decimal> {
    let end = before + usage;
    let mut lo = Decimal::ZERO;
    let mut out = Vec::with_capacity(bounds.len());
    for bound in bounds {
        let a = before.max(lo);
        let b = match bound {
            Some(hi) => end.min(*hi),
            None => end,
        };
        out.push((b - a).max(Decimal::ZERO));
        if let Some(hi) = bound {
            lo = *hi;
        }
    }
    out
}

/// Prices `req` against one class of one tariff; lines in tier order, then component order,
/// then fixed charges. Zero-volume lines are left out.
///
/// # Errors
/// [`BillingError::OutOfRange`] for inputs outside the accepted ranges.
pub fn price_class(class: &Class, req: &QuoteRequest) -> Result<Vec<Line>, BillingError> {
    check_request(req)?;
    let bounds = class.bounds(req.persons, req.tier_scale);
    let volumes = split_tiers(&bounds, req.usage_before, req.usage);
    let mut lines = Vec::new();
    for (i, (tier, volume)) in class.tiers.iter().zip(volumes).enumerate() {
        if volume.is_zero() {
            continue;
        }
        for component in tier.prices.keys().copied() {
            let unit_price = class
                .price(i, component, req.township)
                .unwrap_or(Decimal::ZERO);
            lines.push(Line {
                component: component.as_str().to_owned(),
                tier: u32::try_from(i + 1).unwrap_or(u32::MAX),
                volume_m3: volume.normalize(),
                unit_price,
                amount: to_fen(volume * unit_price),
            });
        }
    }
    if !req.fixed_share.is_zero() {
        for f in &class.fixed_charges {
            lines.push(Line {
                component: format!("fixed:{}", f.name),
                tier: 0,
                volume_m3: Decimal::ZERO,
                unit_price: f.amount,
                amount: to_fen(f.amount * req.fixed_share),
            });
        }
    }
    Ok(lines)
}

/// Sum of line amounts.
pub fn total_of<'a>(lines: impl IntoIterator<Item = &'a Line>) -> Decimal {
    let mut t = lines
        .into_iter()
        .fold(Decimal::ZERO, |acc, l| acc + l.amount);
    t.rescale(2);
    t
}

/// A priced usage, as the `billing quote` CLI prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quote {
    /// Tariff name.
    pub tariff: String,
    /// Tariff version (effective date + content hash).
    pub tariff_version: String,
    /// Trust level of the prices.
    pub status: TariffStatus,
    /// Set when the prices are not verified: print it next to every figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// Class id.
    pub class: String,
    /// Persons in the household.
    pub persons: u32,
    /// Tier period of the tariff.
    pub tier_period: TierPeriod,
    /// Usage earlier in the tier period.
    pub usage_before: Decimal,
    /// Usage priced.
    pub usage: Decimal,
    /// Lines per tier and component.
    pub lines: Vec<Line>,
    /// Sum of the lines, yuan with two decimals.
    pub total: Decimal,
}

/// Prices `req` with the tariff of `book` applying on `date`.
///
/// # Errors
/// [`BillingError::Tariff`] when no tariff defines the class on `date`, or out-of-range inputs.
pub fn quote(
    book: &TariffBook,
    date: time::Date,
    req: &QuoteRequest,
) -> Result<Quote, BillingError> {
    let (tariff, class) = book.lookup(&req.class, date)?;
    let lines = price_class(class, req)?;
    let notice = match tariff.status {
        TariffStatus::Verified => None,
        TariffStatus::Example => {
            Some("EXAMPLE prices for the file structure only; not an official tariff".to_owned())
        }
        TariffStatus::Unverified => {
            Some("prices not marked verified in the tariff file".to_owned())
        }
    };
    Ok(Quote {
        tariff: tariff.name.clone(),
        tariff_version: tariff.version.clone(),
        status: tariff.status,
        notice,
        class: class.id.clone(),
        persons: req.persons,
        tier_period: tariff.tier_period,
        usage_before: req.usage_before,
        usage: req.usage,
        total: total_of(&lines),
        lines,
    })
}
