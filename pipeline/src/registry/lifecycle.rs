//! The meter lifecycle as a pure state machine: which operation may move a meter from which
//! status, and to which. The database functions in [`super`] consult it before writing.

use std::fmt;

/// Lifecycle status of a registered meter (`meters.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// In the store, not mounted anywhere.
    InStock,
    /// Mounted at its location, not yet commissioned.
    Installed,
    /// In service: reads are billed.
    Active,
    /// In service but marked faulty (awaiting repair or replacement).
    Faulty,
    /// Taken out and superseded by another meter number (terminal).
    Replaced,
    /// Taken out of service for good (terminal).
    Retired,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 6] = [
        Status::InStock,
        Status::Installed,
        Status::Active,
        Status::Faulty,
        Status::Replaced,
        Status::Retired,
    ];

    /// The database and CSV spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InStock => "in_stock",
            Status::Installed => "installed",
            Status::Active => "active",
            Status::Faulty => "faulty",
            Status::Replaced => "replaced",
            Status::Retired => "retired",
        }
    }

    /// Parses the database and CSV spelling.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True when the meter is mounted and may send frames (it belongs in its gateway's
    /// device set).
    pub fn is_mounted(self) -> bool {
        matches!(self, Status::Installed | Status::Active | Status::Faulty)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lifecycle operation (each is audited as `registry.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Mount a meter from stock at its location.
    Install,
    /// Commission an installed meter, or bring a repaired faulty one back.
    Activate,
    /// Mark a mounted meter faulty.
    MarkFaulty,
    /// Replace the device behind the same meter id (IF-METER-002): the meter stays in service.
    Replace,
    /// Replace by another meter number: this one becomes `replaced`.
    ReplaceBySuccessor,
    /// Take out of service for good.
    Retire,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 6] = [
        Op::Install,
        Op::Activate,
        Op::MarkFaulty,
        Op::Replace,
        Op::ReplaceBySuccessor,
        Op::Retire,
    ];

    /// The name used in the audit log (`registry.<name>`) and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Install => "install",
            Op::Activate => "activate",
            Op::MarkFaulty => "mark_faulty",
            Op::Replace => "replace",
            Op::ReplaceBySuccessor => "replace_by_successor",
            Op::Retire => "retire",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status `op` leads to from `from`, or `None` when the transition is illegal.
///
/// ```text
/// in_stock ─install→ installed ─activate→ active ─mark_faulty→ faulty ─activate→ active
/// installed|active|faulty ─replace→ active (same meter id, new device)
/// installed|active|faulty ─replace_by_successor→ replaced
/// in_stock|installed|active|faulty ─retire→ retired
/// ```
pub fn next(from: Status, op: Op) -> Option<Status> {
    use Status::*;
    match (op, from) {
        (Op::Install, InStock) => Some(Installed),
        (Op::Activate, Installed | Faulty) => Some(Active),
        (Op::MarkFaulty, Installed | Active) => Some(Faulty),
        (Op::Replace, Installed | Active | Faulty) => Some(Active),
        (Op::ReplaceBySuccessor, Installed | Active | Faulty) => Some(Replaced),
        (Op::Retire, InStock | Installed | Active | Faulty) => Some(Retired),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_allow_nothing() {
        for op in Op::ALL {
            assert_eq!(next(Status::Replaced, op), None, "{op}");
            assert_eq!(next(Status::Retired, op), None, "{op}");
        }
    }

    #[test]
    fn spelling_round_trips() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("broken"), None);
    }

    #[test]
    fn the_happy_path() {
        let mut s = Status::InStock;
        for (op, want) in [
            (Op::Install, Status::Installed),
            (Op::Activate, Status::Active),
            (Op::MarkFaulty, Status::Faulty),
            (Op::Replace, Status::Active),
            (Op::Retire, Status::Retired),
        ] {
            s = next(s, op).unwrap_or_else(|| panic!("{op} from {s}"));
            assert_eq!(s, want);
        }
    }
}
