//! The one retry policy of the database layer: which failures a retry can cure, how long to
//! wait before the next attempt, and when a writer that keeps failing reports itself stuck.
//!
//! Policy (the ingest worker's commit and journal fold both follow it):
//! - The database refusing the data itself (SQLSTATE classes 22 data exception, 23 integrity
//!   violation, 54 program limit exceeded) is [`Failure::Data`]: the same batch would be
//!   refused again, so the caller isolates the refused readings (once) instead of waiting.
//! - A conflict between concurrent transactions (40001 serialization failure, 40P01 deadlock)
//!   is [`Failure::Conflict`]; connection loss, a database shutting down and everything else is
//!   [`Failure::Transient`]. Both are retried after a linear backoff: `step` × attempt, at most
//!   `step` × `max_steps` (200 ms … 5 s for ingest), without limit (the worker acknowledges
//!   nothing meanwhile, so nothing is lost) or up to the caller's attempt limit.
//! - At attempt `stuck_after` (8, about 9 s of retrying) the writer reports itself stuck once.
//!
//! A unique violation inside the ingest transaction's COPY is not a retry: `write_batch` rolls
//! back to its savepoint and merges instead (see [`super::write`]).

use std::time::Duration;

use super::error::StoreError;

/// How a failed database attempt is to be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database refuses the data itself; retrying the same data cannot cure it.
    Data,
    /// Two transactions collided (serialization failure, deadlock); a retry cures it.
    Conflict,
    /// Anything else (connection lost, database shutting down); a later retry cures it.
    Transient,
}

/// Classifies a failed attempt; see the module documentation for the policy.
pub fn classify(e: &StoreError) -> Failure {
    let source = match e {
        StoreError::Database(s) | StoreError::Stage { source: s, .. } => s,
        StoreError::Journal { .. } | StoreError::Encode { .. } => return Failure::Transient,
    };
    classify_code(source.as_database_error().and_then(|d| d.code()).as_deref())
}

/// Classifies a SQLSTATE (None: not a database error, e.g. a lost connection).
fn classify_code(code: Option<&str>) -> Failure {
    match code {
        Some(c) if c.starts_with("22") || c.starts_with("23") || c.starts_with("54") => {
            Failure::Data
        }
        Some("40001" | "40P01") => Failure::Conflict,
        _ => Failure::Transient,
    }
}

/// When to retry and when to report being stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait after the first failed attempt; the n-th waits n times as long.
    pub step: Duration,
    /// The wait grows up to `step` × `max_steps`.
    pub max_steps: u32,
    /// Failed attempts after which the writer reports itself stuck.
    pub stuck_after: u32,
}

/// The ingest worker's policy: 200 ms steps up to 5 s, stuck after 8 failures (about 9 s).
pub const INGEST: RetryPolicy = RetryPolicy {
    step: Duration::from_millis(200),
    max_steps: 25,
    stuck_after: 8,
};

impl RetryPolicy {
    /// Wait before the next attempt after `failed` failed attempts (1 = the first failed).
    pub fn backoff(&self, failed: u32) -> Duration {
        self.step.saturating_mul(failed.min(self.max_steps))
    }

    /// True at exactly the failure that makes the writer stuck (reported once).
    pub fn becomes_stuck(&self, failed: u32) -> bool {
        failed == self.stuck_after
    }

    /// True when a success after `failed` failed attempts ends a reported stuck state.
    pub fn was_stuck(&self, failed: u32) -> bool {
        failed >= self.stuck_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified_by_policy() {
        for code in ["22003", "22P02", "23505", "23502", "54000"] {
            assert_eq!(classify_code(Some(code)), Failure::Data, "{code}");
        }
        assert_eq!(classify_code(Some("40001")), Failure::Conflict);
        assert_eq!(classify_code(Some("40P01")), Failure::Conflict);
        for code in [Some("57P01"), Some("08006"), Some("53300"), None] {
            assert_eq!(classify_code(code), Failure::Transient, "{code:?}");
        }
    }

    #[test]
    fn non_database_errors_are_transient() {
        let e = StoreError::Encode {
            field: "tariff",
            meter: "m".into(),
        };
        assert_eq!(classify(&e), Failure::Transient);
        let e = StoreError::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(classify(&e), Failure::Transient);
    }

    #[test]
    fn backoff_grows_linearly_to_its_cap_and_stuck_is_reported_once() {
        assert_eq!(INGEST.backoff(1), Duration::from_millis(200));
        assert_eq!(INGEST.backoff(8), Duration::from_millis(1600));
        assert_eq!(INGEST.backoff(25), Duration::from_secs(5));
        assert_eq!(INGEST.backoff(u32::MAX), Duration::from_secs(5));
        let stuck: Vec<u32> = (0..100).filter(|a| INGEST.becomes_stuck(*a)).collect();
        assert_eq!(stuck, vec![8]);
        assert!(!INGEST.was_stuck(7));
        assert!(INGEST.was_stuck(8));
        // About 9 s of retrying before the stuck report (waits after failures 1..=7, plus the attempts).
        let waited: Duration = (1..INGEST.stuck_after).map(|a| INGEST.backoff(a)).sum();
        assert_eq!(waited, Duration::from_millis(5600));
    }
}
