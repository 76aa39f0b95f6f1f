//! Tariff files: TOML as billing staff write it, validated into [`Tariff`], grouped by
//! effective date into a [`TariffBook`].
//!
//! Parsing is pure: callers read the file and pass its name and text, so every error can name
//! the file, the line and the field (`tariffs/nanan-2025.toml:14: classes[0].tiers[1].up_to: ...`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::Date;
use toml::Spanned;

/// Price precision accepted in tariff files (yuan per m3): `bill_lines.unit_price` is numeric(12,4).
pub const PRICE_SCALE: u32 = 4;
/// Largest price, bound or charge accepted in a tariff file.
pub const MAX_VALUE: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);
/// Volume precision accepted for tier bounds (m3).
pub const VOLUME_SCALE: u32 = 3;

/// A per-m3 charge component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// Water supply (自来水费).
    Water,
    /// Sewage treatment (污水处理费).
    Sewage,
    /// Water resource fee or tax (水资源费/税).
    Resource,
}

impl Component {
    /// The name used in tariff files and bill lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Water => "water",
            Self::Sewage => "sewage",
            Self::Resource => "resource",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "water" => Some(Self::Water),
            "sewage" => Some(Self::Sewage),
            // Files may name the fee or (since the 2024-12-01 reform) the tax.
            "resource" | "resource_fee" | "resource_tax" => Some(Self::Resource),
            _ => None,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The span tier volumes apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierPeriod {
    /// Tier volumes per household per calendar month.
    Month,
    /// Tier volumes per household per calendar year (the tariff year is the calendar year).
    Year,
}

/// How far the prices of a file may be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TariffStatus {
    /// Checked against a published notice (the file's `source` names it).
    Verified,
    /// Structure only; prices are illustrative and must never be quoted as official.
    Example,
    /// Not stated in the file.
    Unverified,
}

/// A fixed charge per bill (e.g. meter service fee), prorated by days when a bill spans a
/// tariff change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FixedCharge {
    /// Name shown on the bill (`fixed:<name>`).
    pub name: String,
    /// Yuan per bill, fen precision.
    pub amount: Decimal,
}

/// One tier of a class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tier {
    /// Upper bound (inclusive) in m3 per tier period for the base household; `None` on the last tier.
    pub up_to: Option<Decimal>,
    /// Price per m3 of each component, yuan.
    pub prices: BTreeMap<Component, Decimal>,
}

/// A customer class of a tariff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Class {
    /// Class id (`residential`, `non_residential`, `special`, ...).
    pub id: String,
    /// Free description.
    pub description: Option<String>,
    /// Household size the tier volumes are for.
    pub base_persons: Option<u32>,
    /// m3 per tier period added to every tier boundary per person above `base_persons`.
    pub extra_volume_per_person: Decimal,
    /// Tiers in ascending order.
    pub tiers: Vec<Tier>,
    /// Fixed charges per bill.
    pub fixed_charges: Vec<FixedCharge>,
    /// Component prices replacing the tier prices for township customers (乡镇), e.g. sewage.
    pub township: BTreeMap<Component, Decimal>,
}

impl Class {
    /// Upper bounds of the tiers for a household of `persons`, scaled by `scale` tier periods;
    /// `None` for the open last tier.
    pub fn bounds(&self, persons: u32, scale: Decimal) -> Vec<Option<Decimal>> {
        let extra_persons = self
            .base_persons
            .map_or(0, |base| persons.saturating_sub(base));
        let extra = self.extra_volume_per_person * Decimal::from(extra_persons);
        self.tiers
            .iter()
            .map(|t| t.up_to.map(|u| (u + extra) * scale))
            .collect()
    }

    /// Price of `component` in `tier` (0-based), with the township override applied.
    pub fn price(&self, tier: usize, component: Component, township: bool) -> Option<Decimal> {
        let base = self.tiers.get(tier)?.prices.get(&component).copied()?;
        if township {
            Some(self.township.get(&component).copied().unwrap_or(base))
        } else {
            Some(base)
        }
    }
}

/// One validated tariff file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tariff {
    /// File name it was read from (for messages).
    pub file: String,
    /// Human name.
    pub name: String,
    /// Currency (only CNY).
    pub currency: String,
    /// First day the prices apply (inclusive).
    pub effective_from: Date,
    /// Span of the tier volumes.
    pub tier_period: TierPeriod,
    /// Trust level of the prices.
    pub status: TariffStatus,
    /// Where the prices come from.
    pub source: Option<String>,
    /// Free notes of the file's author.
    pub notes: Option<String>,
    /// `effective_from` + the first 12 hex digits of the file's SHA-256: stored on every bill.
    pub version: String,
    /// Classes by id, in file order.
    pub classes: Vec<Class>,
}

impl Tariff {
    /// Parses and validates a tariff file; `file` is only used in messages and [`Tariff::file`].
    ///
    /// # Errors
    /// [`TariffError::Syntax`] for TOML errors and [`TariffError::Invalid`] for values that break
    /// a rule, both with the line.
    pub fn parse(file: &str, text: &str) -> Result<Self, TariffError> {
        let raw: RawTariff = toml::from_str(text).map_err(|e| TariffError::Syntax {
            file: file.to_owned(),
            line: e.span().map_or(0, |s| line_of(text, s.start)),
            message: e.message().trim().to_owned(),
        })?;
        let ctx = Ctx { file, text };
        let digest = Sha256::digest(text.as_bytes());
        let hash: String = hex_prefix(&digest, 6);
        ctx.validate(raw, hash)
    }

    /// The class `id`, if this file defines it.
    pub fn class(&self, id: &str) -> Option<&Class> {
        self.classes.iter().find(|c| c.id == id)
    }
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(n * 2);
    for b in bytes.iter().take(n) {
        for nibble in [b >> 4, b & 0x0f] {
            s.push(char::from(
                HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'),
            ));
        }
    }
    s
}

/// Why a tariff file or book was refused, or no tariff applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TariffError {
    /// The file is not valid TOML or does not have the expected shape.
    #[error("{file}:{line}: {message}")]
    Syntax {
        /// File name.
        file: String,
        /// 1-based line (0 when unknown).
        line: usize,
        /// Parser message.
        message: String,
    },
    /// A field breaks a rule.
    #[error("{file}:{line}: {field}: {message}")]
    Invalid {
        /// File name.
        file: String,
        /// 1-based line.
        line: usize,
        /// Path of the field, e.g. `classes[0].tiers[1].up_to`.
        field: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// Two files define the same class from the same date.
    #[error("{first} and {second} both define class {class} from {date}")]
    Ambiguous {
        /// One file.
        first: String,
        /// The other file.
        second: String,
        /// The class.
        class: String,
        /// The shared effective date.
        date: Date,
    },
    /// A tariff file could not be read.
    #[error("cannot read tariff file {file}: {message}")]
    Read {
        /// The path.
        file: String,
        /// The operating system's reason.
        message: String,
    },
    /// No file defines the class on that date.
    #[error("no tariff defines class {class} on {date}")]
    NoTariff {
        /// The class asked for.
        class: String,
        /// The date asked for.
        date: Date,
    },
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |prefix| {
        prefix.bytes().filter(|b| *b == b'\n').count() + 1
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTariff {
    name: Spanned<String>,
    currency: Spanned<String>,
    effective_from: Spanned<String>,
    tier_period: Spanned<String>,
    #[serde(default)]
    status: Option<Spanned<String>>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    notes: Option<String>,
    classes: Spanned<Vec<RawClass>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    id: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    base_persons: Option<Spanned<toml::Value>>,
    #[serde(default)]
    extra_volume_per_person: Option<Spanned<toml::Value>>,
    tiers: Spanned<Vec<RawTier>>,
    #[serde(default)]
    fixed_charges: Vec<RawFixed>,
    #[serde(default)]
    township: Option<Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    #[serde(default)]
    up_to: Option<Spanned<toml::Value>>,
    prices: Spanned<BTreeMap<String, Spanned<toml::Value>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFixed {
    name: Spanned<String>,
    amount: Spanned<toml::Value>,
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        field: &str,
        message: impl Into<String>,
    ) -> Result<T, TariffError> {
        Err(TariffError::Invalid {
            file: self.file.to_owned(),
            line: line_of(self.text, span.start),
            field: field.to_owned(),
            message: message.into(),
        })
    }

    /// A non-negative decimal with at most `scale` places, written as a string or an integer.
    fn decimal(
        &self,
        v: &Spanned<toml::Value>,
        field: &str,
        scale: u32,
    ) -> Result<Decimal, TariffError> {
        let d = match v.get_ref() {
            toml::Value::String(s) => match s.trim().parse::<Decimal>() {
                Ok(d) => d,
                Err(_) => {
                    return self.err(v.span(), field, format!("{s:?} is not a decimal number"));
                }
            },
            toml::Value::Integer(i) => Decimal::from(*i),
            toml::Value::Float(_) => {
                return self.err(
                    v.span(),
                    field,
                    "write amounts as decimal strings (e.g. \"1.85\"), floats are inexact",
                );
            }
            other => {
                return self.err(
                    v.span(),
                    field,
                    format!("expected a decimal string, found {}", other.type_str()),
                );
            }
        };
        if d.is_sign_negative() {
            return self.err(v.span(), field, format!("{d} is negative"));
        }
        // Bounded so that no product in a bill can overflow `Decimal` (see quote::MAX_VOLUME).
        if d > MAX_VALUE {
            return self.err(v.span(), field, format!("{d} is above {MAX_VALUE}"));
        }
        if d.normalize().scale() > scale {
            return self.err(
                v.span(),
                field,
                format!("{d} has more than {scale} decimal places"),
            );
        }
        Ok(d.normalize())
    }

    fn prices(
        &self,
        map: &Spanned<BTreeMap<String, Spanned<toml::Value>>>,
        field: &str,
    ) -> Result<BTreeMap<Component, Decimal>, TariffError> {
        let mut out = BTreeMap::new();
        for (key, value) in map.get_ref() {
            let f = format!("{field}.{key}");
            let Some(component) = Component::parse(key) else {
                return self.err(
                    value.span(),
                    &f,
                    "unknown component (expected water, sewage or resource)",
                );
            };
            if out
                .insert(component, self.decimal(value, &f, PRICE_SCALE)?)
                .is_some()
            {
                return self.err(
                    value.span(),
                    &f,
                    format!("component {component} given twice"),
                );
            }
        }
        Ok(out)
    }

    fn validate(&self, raw: RawTariff, hash: String) -> Result<Tariff, TariffError> {
        if raw.name.get_ref().trim().is_empty() {
            return self.err(raw.name.span(), "name", "must not be empty");
        }
        if raw.currency.get_ref() != "CNY" {
            return self.err(
                raw.currency.span(),
                "currency",
                format!(
                    "{:?} is not supported (expected \"CNY\")",
                    raw.currency.get_ref()
                ),
            );
        }
        let format = time::macros::format_description!("[year]-[month]-[day]");
        let Ok(effective_from) = Date::parse(raw.effective_from.get_ref(), format) else {
            return self.err(
                raw.effective_from.span(),
                "effective_from",
                format!(
                    "{:?} is not a date YYYY-MM-DD",
                    raw.effective_from.get_ref()
                ),
            );
        };
        let tier_period = match raw.tier_period.get_ref().as_str() {
            "month" => TierPeriod::Month,
            "year" => TierPeriod::Year,
            other => {
                return self.err(
                    raw.tier_period.span(),
                    "tier_period",
                    format!("{other:?} (expected \"month\" or \"year\")"),
                );
            }
        };
        let status = match raw
            .status
            .as_ref()
            .map(|s| (s.get_ref().as_str(), s.span()))
        {
            None => TariffStatus::Unverified,
            Some(("verified", _)) => TariffStatus::Verified,
            Some(("example", _)) => TariffStatus::Example,
            Some(("unverified", _)) => TariffStatus::Unverified,
            Some((other, span)) => {
                return self.err(
                    span,
                    "status",
                    format!("{other:?} (expected \"verified\", \"example\" or \"unverified\")"),
                );
            }
        };
        if status == TariffStatus::Verified
            && raw.source.as_deref().is_none_or(|s| s.trim().is_empty())
        {
            return self.err(
                raw.name.span(),
                "source",
                "a verified tariff must name its source",
            );
        }
        if raw.classes.get_ref().is_empty() {
            return self.err(
                raw.classes.span(),
                "classes",
                "at least one class is required",
            );
        }
        let mut classes: Vec<Class> = Vec::new();
        for (ci, rc) in raw.classes.get_ref().iter().enumerate() {
            let cf = format!("classes[{ci}]");
            let id = rc.id.get_ref().trim().to_owned();
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return self.err(
                    rc.id.span(),
                    &format!("{cf}.id"),
                    format!("{id:?} (expected lowercase letters, digits and _)"),
                );
            }
            if classes.iter().any(|c| c.id == id) {
                return self.err(
                    rc.id.span(),
                    &format!("{cf}.id"),
                    format!("class {id} defined twice"),
                );
            }
            let base_persons = match &rc.base_persons {
                None => None,
                Some(v) => match v.get_ref() {
                    toml::Value::Integer(n) if (1..=100).contains(n) => u32::try_from(*n).ok(),
                    _ => {
                        return self.err(
                            v.span(),
                            &format!("{cf}.base_persons"),
                            "expected a whole number of persons from 1 to 100",
                        );
                    }
                },
            };
            let extra_volume_per_person = match &rc.extra_volume_per_person {
                None => Decimal::ZERO,
                Some(v) => {
                    if base_persons.is_none() {
                        return self.err(
                            v.span(),
                            &format!("{cf}.extra_volume_per_person"),
                            "needs base_persons",
                        );
                    }
                    self.decimal(v, &format!("{cf}.extra_volume_per_person"), VOLUME_SCALE)?
                }
            };
            let tiers_raw = rc.tiers.get_ref();
            if tiers_raw.is_empty() {
                return self.err(
                    rc.tiers.span(),
                    &format!("{cf}.tiers"),
                    "at least one tier is required",
                );
            }
            let mut tiers: Vec<Tier> = Vec::new();
            let last = tiers_raw.len() - 1;
            for (ti, rt) in tiers_raw.iter().enumerate() {
                let tf = format!("{cf}.tiers[{ti}]");
                let up_to = match (&rt.up_to, ti == last) {
                    (Some(v), true) => {
                        return self.err(
                            v.span(),
                            &format!("{tf}.up_to"),
                            "the last tier is open: omit up_to",
                        );
                    }
                    (None, false) => {
                        return self.err(
                            rt.prices.span(),
                            &format!("{tf}.up_to"),
                            "missing (only the last tier is open)",
                        );
                    }
                    (None, true) => None,
                    (Some(v), false) => {
                        let u = self.decimal(v, &format!("{tf}.up_to"), VOLUME_SCALE)?;
                        let previous = tiers.last().and_then(|t| t.up_to).unwrap_or(Decimal::ZERO);
                        if u <= previous {
                            return self.err(
                                v.span(),
                                &format!("{tf}.up_to"),
                                format!("{u} must be above the previous bound {previous}"),
                            );
                        }
                        Some(u)
                    }
                };
                let prices = self.prices(&rt.prices, &format!("{tf}.prices"))?;
                if prices.is_empty() {
                    return self.err(
                        rt.prices.span(),
                        &format!("{tf}.prices"),
                        "at least one component price is required",
                    );
                }
                tiers.push(Tier { up_to, prices });
            }
            let mut fixed_charges: Vec<FixedCharge> = Vec::new();
            for (fi, rf) in rc.fixed_charges.iter().enumerate() {
                let ff = format!("{cf}.fixed_charges[{fi}]");
                let name = rf.name.get_ref().trim().to_owned();
                if name.is_empty() || fixed_charges.iter().any(|f| f.name == name) {
                    return self.err(
                        rf.name.span(),
                        &format!("{ff}.name"),
                        "must be a non-empty name, unique in the class",
                    );
                }
                let amount = self.decimal(&rf.amount, &format!("{ff}.amount"), 2)?;
                fixed_charges.push(FixedCharge { name, amount });
            }
            let township = match &rc.township {
                None => BTreeMap::new(),
                Some(t) => {
                    let m = self.prices(t, &format!("{cf}.township"))?;
                    for c in m.keys() {
                        if !tiers.iter().any(|t| t.prices.contains_key(c)) {
                            return self.err(
                                t.span(),
                                &format!("{cf}.township.{c}"),
                                "no tier of the class charges this component",
                            );
                        }
                    }
                    m
                }
            };
            classes.push(Class {
                id,
                description: rc.description.clone(),
                base_persons,
                extra_volume_per_person,
                tiers,
                fixed_charges,
                township,
            });
        }
        Ok(Tariff {
            file: self.file.to_owned(),
            name: raw.name.into_inner(),
            currency: raw.currency.into_inner(),
            effective_from,
            tier_period,
            status,
            source: raw.source,
            notes: raw.notes,
            version: format!("{effective_from}+{hash}"),
            classes,
        })
    }
}

/// Several tariff files of one utility: for a class and a date, the file with the latest
/// `effective_from` on or before that date that defines the class applies.
#[derive(Debug, Clone, Default)]
pub struct TariffBook {
    versions: Vec<Arc<Tariff>>,
}

impl TariffBook {
    /// Builds a book from validated files.
    ///
    /// # Errors
    /// [`TariffError::Ambiguous`] when two files define the same class from the same date.
    pub fn new(tariffs: impl IntoIterator<Item = Tariff>) -> Result<Self, TariffError> {
        let mut versions: Vec<Arc<Tariff>> = tariffs.into_iter().map(Arc::new).collect();
        versions.sort_by_key(|t| t.effective_from);
        for (i, a) in versions.iter().enumerate() {
            for b in versions.iter().skip(i + 1) {
                if a.effective_from != b.effective_from {
                    continue;
                }
                if let Some(c) = a.classes.iter().find(|c| b.class(&c.id).is_some()) {
                    return Err(TariffError::Ambiguous {
                        first: a.file.clone(),
                        second: b.file.clone(),
                        class: c.id.clone(),
                        date: a.effective_from,
                    });
                }
            }
        }
        Ok(Self { versions })
    }

    /// Parses each `(file name, text)` and builds the book.
    ///
    /// # Errors
    /// The first file error, or [`TariffError::Ambiguous`].
    pub fn parse<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, TariffError> {
        let tariffs = files
            .into_iter()
            .map(|(name, text)| Tariff::parse(name, text))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(tariffs)
    }

    /// Reads and parses tariff files: the one loader of the `billing`, `pipeline` and `api`
    /// binaries and the tests (each file is named by its path in errors and in the book).
    ///
    /// # Errors
    /// [`TariffError::Read`] for a file that cannot be read, then as [`TariffBook::parse`].
    pub fn load<P: AsRef<std::path::Path>>(files: &[P]) -> Result<Self, TariffError> {
        let texts = files
            .iter()
            .map(|p| {
                let p = p.as_ref();
                let file = p.display().to_string();
                std::fs::read_to_string(p)
                    .map(|t| (file.clone(), t))
                    .map_err(|e| TariffError::Read {
                        file,
                        message: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())))
    }

    /// All versions, oldest first.
    pub fn versions(&self) -> &[Arc<Tariff>] {
        &self.versions
    }

    /// The tariff and class that apply to `class` on `date`.
    ///
    /// # Errors
    /// [`TariffError::NoTariff`] when no file defines the class on that date.
    pub fn lookup(&self, class: &str, date: Date) -> Result<(&Arc<Tariff>, &Class), TariffError> {
        self.versions
            .iter()
            .rev()
            .filter(|t| t.effective_from <= date)
            .find_map(|t| t.class(class).map(|c| (t, c)))
            .ok_or_else(|| TariffError::NoTariff {
                class: class.to_owned(),
                date,
            })
    }

    /// Dates strictly inside `(from, to)` where the tariff applying to `class` changes.
    pub fn changes_within(&self, class: &str, from: Date, to: Date) -> Vec<Date> {
        let mut out: Vec<Date> = self
            .versions
            .iter()
            .filter(|t| {
                t.effective_from > from && t.effective_from < to && t.class(class).is_some()
            })
            .map(|t| t.effective_from)
            .collect();
        out.dedup();
        out
    }
}
