//! Tiered water tariffs and exact bills.
//!
//! `billing-core` owns tariffs (TOML data, validated) and the bill computation from validated
//! register reads: tiers, components, proration and rounding to the fen. It is pure: no I/O, no
//! clock, no floats (`rust_decimal` only). Bill runs against the database live in `pipeline`.
//! The rules are explained for billing staff in `docs/billing.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::float_arithmetic)]

pub mod bill;
pub mod quote;
pub mod run_policy;
pub mod tariff;

pub use bill::{
    Bill, BillLine, BillRequest, LineKind, RegisterRead, Replacement, Segment, Usage,
    adjustment_lines, bill_total, compute_bill, register_usage,
};
pub use quote::{BillingError, Line, Quote, QuoteRequest, price_class, quote, to_fen};
pub use run_policy::{Revision, Skip, StandingBill};
pub use tariff::{Class, Component, Tariff, TariffBook, TariffError, TariffStatus, TierPeriod};
