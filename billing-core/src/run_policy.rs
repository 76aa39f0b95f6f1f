//! The bill run's per-meter decisions, pure: which reads bound the cycle, when a meter is
//! skipped instead of billed, and whether a bill is new, unchanged or an adjustment.
//!
//! `pipeline::billing` fetches the facts from PostgreSQL and asks these functions; keeping the
//! policy here makes it testable without a database and readable in one place.

use rust_decimal::Decimal;
use time::{Duration, OffsetDateTime};

use crate::bill::Replacement;

/// Why a meter gets no bill in this run (the run reports the text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// No previous bill ends where the cycle starts and no billable read lies in the window
    /// before the start boundary.
    #[error("no billable read in the {window_days} days before the cycle start {boundary}")]
    NoStartRead {
        /// The read window, in whole days.
        window_days: i64,
        /// The cycle start (local midnight).
        boundary: OffsetDateTime,
    },
    /// No billable read between `after` and the end boundary.
    #[error("no billable read after {after} and at or before the cycle end {boundary}")]
    NoEndRead {
        /// The earliest time an end read may have (exclusive).
        after: OffsetDateTime,
        /// The cycle end (local midnight).
        boundary: OffsetDateTime,
    },
    /// Too many of the cycle's reads are estimated or edited: a person reviews first.
    #[error(
        "held for review: {doubtful} of {total} reads in the cycle are estimated or edited (limit {limit})"
    )]
    HeldForReview {
        /// Estimated or edited reads.
        doubtful: i64,
        /// All billable reads.
        total: i64,
        /// The largest share allowed.
        limit: Decimal,
    },
    /// More than one meter replacement within the cycle.
    #[error("more than one meter replacement in the cycle: bill by hand")]
    SeveralReplacements,
}

/// The earliest time (exclusive) an end read may have: not before the start read, and within
/// `window` before the end boundary.
pub fn end_read_after(
    start_ts: OffsetDateTime,
    end_boundary: OffsetDateTime,
    window: Duration,
) -> OffsetDateTime {
    start_ts.max(end_boundary - window)
}

/// Holds a meter for review when more than `limit` (a share, 0..=1) of its `total` billable
/// reads are estimated or edited; no limit, or no reads, never holds.
///
/// # Errors
/// [`Skip::HeldForReview`].
pub fn check_estimated_share(
    total: i64,
    doubtful: i64,
    limit: Option<Decimal>,
) -> Result<(), Skip> {
    match limit {
        Some(limit) if total > 0 && Decimal::from(doubtful) > limit * Decimal::from(total) => {
            Err(Skip::HeldForReview {
                doubtful,
                total,
                limit,
            })
        }
        _ => Ok(()),
    }
}

/// The cycle's meter replacement (values normalised), if any.
///
/// # Errors
/// [`Skip::SeveralReplacements`] for more than one: the bill needs a person.
pub fn single_replacement(replacements: &[Replacement]) -> Result<Option<Replacement>, Skip> {
    match replacements {
        [] => Ok(None),
        [r] => Ok(Some(Replacement {
            at: r.at,
            old_final: r.old_final.normalize(),
            new_initial: r.new_initial.normalize(),
        })),
        _ => Err(Skip::SeveralReplacements),
    }
}

/// The newest stored bill of a meter in a cycle, as the revision choice needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandingBill<'a> {
    /// Its id.
    pub bill_id: i64,
    /// Its revision (0 for the original).
    pub revision: i32,
    /// The fingerprint of the inputs it was computed from (`None` for bills from before
    /// fingerprints were stored).
    pub inputs_hash: Option<&'a str>,
}

/// What the run writes for a meter whose bill it computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revision {
    /// The standing bill was computed from the same inputs: write nothing.
    Unchanged,
    /// No bill yet: revision 0.
    Original,
    /// An adjustment of `adjusts` (its lines are the difference), revision `revision`.
    Adjustment {
        /// The bill adjusted.
        adjusts: i64,
        /// The new revision number.
        revision: i32,
    },
}

/// Chooses between no write, an original bill and an adjustment, by comparing the new bill's
/// `fingerprint` with the standing bill's.
pub fn choose_revision(standing: Option<StandingBill<'_>>, fingerprint: &str) -> Revision {
    match standing {
        None => Revision::Original,
        Some(s) if s.inputs_hash == Some(fingerprint) => Revision::Unchanged,
        Some(s) => Revision::Adjustment {
            adjusts: s.bill_id,
            revision: s.revision + 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use time::macros::datetime;

    #[test]
    fn the_end_read_window_starts_after_the_start_read_or_the_window() {
        let end = datetime!(2026-02-01 0:00 +8);
        let w = Duration::days(7);
        assert_eq!(
            end_read_after(datetime!(2026-01-01 0:00 +8), end, w),
            datetime!(2026-01-25 0:00 +8)
        );
        // A start read inside the window moves the window's start to it.
        assert_eq!(
            end_read_after(datetime!(2026-01-28 6:00 +8), end, w),
            datetime!(2026-01-28 6:00 +8)
        );
    }

    #[test]
    fn an_estimated_share_above_the_limit_holds_the_meter() {
        assert_eq!(check_estimated_share(10, 3, Some(dec!(0.3))), Ok(()));
        let held = check_estimated_share(10, 4, Some(dec!(0.3))).unwrap_err();
        assert_eq!(
            held.to_string(),
            "held for review: 4 of 10 reads in the cycle are estimated or edited (limit 0.3)"
        );
        assert_eq!(check_estimated_share(0, 0, Some(dec!(0))), Ok(()));
        assert_eq!(check_estimated_share(10, 10, None), Ok(()));
        assert!(check_estimated_share(1, 1, Some(dec!(0))).is_err());
    }

    #[test]
    fn one_replacement_is_used_normalised_two_need_a_person() {
        let r = Replacement {
            at: datetime!(2026-01-10 0:00 UTC),
            old_final: dec!(12.500),
            new_initial: dec!(0.000),
        };
        assert_eq!(single_replacement(&[]), Ok(None));
        let one = single_replacement(std::slice::from_ref(&r))
            .unwrap()
            .unwrap();
        assert_eq!(one.old_final.to_string(), "12.5");
        assert_eq!(one.new_initial.to_string(), "0");
        assert_eq!(
            single_replacement(&[r.clone(), r]),
            Err(Skip::SeveralReplacements)
        );
    }

    #[test]
    fn the_revision_follows_the_fingerprint() {
        assert_eq!(choose_revision(None, "h1"), Revision::Original);
        let s = StandingBill {
            bill_id: 7,
            revision: 2,
            inputs_hash: Some("h1"),
        };
        assert_eq!(choose_revision(Some(s), "h1"), Revision::Unchanged);
        assert_eq!(
            choose_revision(Some(s), "h2"),
            Revision::Adjustment {
                adjusts: 7,
                revision: 3
            }
        );
        let old = StandingBill {
            inputs_hash: None,
            ..s
        };
        assert_eq!(
            choose_revision(Some(old), "h1"),
            Revision::Adjustment {
                adjusts: 7,
                revision: 3
            }
        );
    }

    #[test]
    fn skip_texts_name_the_boundaries() {
        let s = Skip::NoStartRead {
            window_days: 7,
            boundary: datetime!(2026-01-01 0:00 +8),
        };
        assert_eq!(
            s.to_string(),
            "no billable read in the 7 days before the cycle start 2026-01-01 0:00:00.0 +08:00:00"
        );
    }
}
