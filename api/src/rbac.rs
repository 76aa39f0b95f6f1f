//! Who may call what: one role set per group of operations, used by the handlers and by the
//! route-by-route RBAC test (`api/tests/rbac.rs`), so the table and the code cannot drift.

use crate::auth::Action;
use crate::auth::Role::{self, *};

/// IF-METER-001: meter queries.
pub const METERS_READ: &[Role] = &[
    MeterOperator,
    MeterAdmin,
    MeterReader,
    Billing,
    Auditor,
    Integration,
];
/// IF-METER-002: registry changes (register, install, activate, faulty, replace, bind, book).
pub const METERS_WRITE: &[Role] = &[MeterOperator, MeterAdmin];
/// Retiring a meter (high-risk; second factor).
pub const METERS_RETIRE: &[Role] = &[MeterAdmin];
/// IF-REV-004: manual reads.
pub const MANUAL_READS: &[Role] = &[MeterReader, MeterOperator, MeterAdmin];
/// EXT-601: readings of a meter.
pub const READINGS_READ: &[Role] = &[
    MeterOperator,
    MeterAdmin,
    MeterReader,
    Billing,
    Auditor,
    Integration,
];
/// Editing a stored read (high-risk; second factor).
pub const READINGS_EDIT: &[Role] = &[MeterAdmin];
/// Alarm list.
pub const ALARMS_READ: &[Role] = &[MeterOperator, MeterAdmin, Auditor];
/// Alarm acknowledge and close.
pub const ALARMS_WRITE: &[Role] = &[MeterOperator, MeterAdmin];
/// IF-REV-005: bill runs and jobs.
pub const BILL_RUN: &[Role] = &[Billing];
/// Bills and jobs (read).
pub const BILLS_READ: &[Role] = &[Billing, Auditor];
/// Arrears and payments.
pub const ARREARS_WRITE: &[Role] = &[Billing];
/// Tariff quotes.
pub const QUOTE: &[Role] = &[Billing, MeterOperator, MeterAdmin, MeterReader];
/// Audit log and its verification.
pub const AUDIT_READ: &[Role] = &[Auditor, MeterAdmin];
/// EXT-1001 and valve control: command and permit state and history (read).
pub const COMMANDS_READ: &[Role] = &[MeterOperator, MeterAdmin, Billing, Auditor];
/// Issuing, cancelling and retrying commands; granting, revoking and using hydrant permits
/// (valve open/close and hydrant unlock also need a second factor).
pub const COMMANDS_WRITE: &[Role] = &[MeterOperator, MeterAdmin];
/// Dashboard reads (issue 23): fleet summary, gateways, DMA balance, the live event stream
/// (which passes each kind of event only to the roles that may read it).
pub const DASHBOARD_READ: &[Role] = &[MeterOperator, MeterAdmin, MeterReader, Billing, Auditor];
/// Second-approver requests: list and read (requesters and approvers alike).
pub const APPROVALS_READ: &[Role] = &[MeterOperator, MeterAdmin, Billing, Auditor];

/// Who may approve (or reject) a held high-risk `action` as the second person: the
/// department's senior role — meter actions by a meter administrator, billing actions by
/// billing. Never the requester (checked separately).
pub fn approvers(action: Action) -> &'static [Role] {
    match action {
        Action::MeterRetire
        | Action::ReadEdit
        | Action::ValveClose
        | Action::ValveOpen
        | Action::HydrantUnlock => &[MeterAdmin],
        Action::BillRerun | Action::ArrearsBulkClear => &[Billing],
    }
}

/// Recording arrears notices (payment demand, advance notice).
pub const ARREARS_NOTICES_WRITE: &[Role] = &[Billing, MeterOperator, MeterAdmin];
/// Arrears notices, held closures and control-rule decisions (read).
pub const ARREARS_RULE_READ: &[Role] = &[Billing, MeterOperator, MeterAdmin, Auditor];
/// Approving held arrears closures (closes valves: second factor or second approver).
pub const ARREARS_CLOSURES_APPROVE: &[Role] = &[Billing, MeterAdmin];
