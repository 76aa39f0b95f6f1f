//! Control rules: burst auto-close and arrears close/reopen (DOMAIN.md §3). Every decision —
//! issued, deferred, refused, awaiting approval — is stored in `control_decisions` with the
//! inputs it was taken on and, when it issued one, the command; the command's `cause` names
//! the alarm or arrears and the decision.

use model::{CommandAction, MeterId};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use time::{Date, OffsetDateTime};

use super::calendar::Calendar;
use super::{
    ControlError, IssueRequest, Issued, PRIORITY_ARREARS, PRIORITY_BURST, PRIORITY_HIGHEST, db,
    rfc3339,
};

/// Rule name of the burst auto-close.
pub const BURST_RULE: &str = "burst_auto_close";
/// Rule name of the arrears close.
pub const ARREARS_CLOSE: &str = "arrears_close";
/// Rule name of the reopen after payment.
pub const ARREARS_REOPEN: &str = "arrears_reopen";

/// One stored decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Rule name.
    pub rule: String,
    /// The meter.
    pub meter: String,
    /// `issued`, `deferred`, `refused`, `awaiting_approval` or `approved`.
    pub outcome: String,
    /// Why, in words.
    pub reason: String,
    /// What it was decided on.
    pub inputs: Value,
    /// The command issued, if any.
    pub command: Option<String>,
}

/// Stores a decision unless the latest decision of the rule for the meter already says the
/// same (a sweep re-evaluating a deferred close does not add a row every minute). Returns
/// whether it was stored.
pub(crate) async fn decide(tx: &mut PgConnection, d: &Decision) -> Result<bool, ControlError> {
    if d.command.is_none() {
        let last: Option<(String, String)> = sqlx::query_as(
            "SELECT outcome, reason FROM control_decisions WHERE meter_id = $1 AND rule = $2 \
             ORDER BY at DESC, decision_id DESC LIMIT 1",
        )
        .bind(&d.meter)
        .bind(&d.rule)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reading the last decision"))?;
        if last.is_some_and(|(o, r)| o == d.outcome && r == d.reason) {
            return Ok(false);
        }
    }
    sqlx::query(
        "INSERT INTO control_decisions (rule, meter_id, outcome, reason, inputs, command_id) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&d.rule)
    .bind(&d.meter)
    .bind(&d.outcome)
    .bind(&d.reason)
    .bind(&d.inputs)
    .bind(&d.command)
    .execute(&mut *tx)
    .await
    .map_err(db("storing a decision"))?;
    Ok(true)
}

/// The decisions about a meter, oldest first.
///
/// # Errors
/// Database errors.
pub async fn decisions(pool: &PgPool, meter: &str) -> Result<Vec<Decision>, ControlError> {
    let rows: Vec<(String, String, String, String, Value, Option<String>)> = sqlx::query_as(
        "SELECT rule, meter_id, outcome, reason, inputs, command_id FROM control_decisions \
         WHERE meter_id = $1 ORDER BY at, decision_id",
    )
    .bind(meter)
    .fetch_all(pool)
    .await
    .map_err(db("reading decisions"))?;
    Ok(rows
        .into_iter()
        .map(|(rule, meter, outcome, reason, inputs, command)| Decision {
            rule,
            meter,
            outcome,
            reason,
            inputs,
            command,
        })
        .collect())
}

fn meter_id(s: &str) -> Result<MeterId, ControlError> {
    MeterId::new(s.to_owned()).map_err(|e| ControlError::Invalid(format!("meter `{s}`: {e}")))
}

/// Burst auto-close: on the open `burst` alarm of `meter`, close its valve when the registry
/// policy (`auto_close_on_burst`, `has_valve`) allows it. Reopening is left to a person.
/// Idempotent per alarm (the command id is `burst-<alarm id>`, and a refusal is stored once).
/// Returns the decision taken now, or `None` when there is no open burst alarm or it was
/// decided before.
///
/// # Errors
/// Database errors and the errors of [`super::issue`].
pub async fn burst_auto_close(
    pool: &PgPool,
    meter: &str,
) -> Result<Option<(Decision, Option<Issued>)>, ControlError> {
    let alarm: Option<(i64, OffsetDateTime, Value)> = sqlx::query_as(
        "SELECT alarm_id, raised_at, detail FROM alarms \
         WHERE meter_id = $1 AND kind = 'burst' AND cleared_at IS NULL",
    )
    .bind(meter)
    .fetch_optional(pool)
    .await
    .map_err(db("reading the burst alarm"))?;
    let Some((alarm_id, raised_at, detail)) = alarm else {
        return Ok(None);
    };
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let seen: Option<i64> = sqlx::query_scalar(
        "SELECT decision_id FROM control_decisions WHERE rule = $1 AND meter_id = $2 \
         AND (inputs->>'alarm_id')::bigint = $3 LIMIT 1",
    )
    .bind(BURST_RULE)
    .bind(meter)
    .bind(alarm_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("checking earlier decisions"))?;
    if seen.is_some() {
        return Ok(None);
    }
    let policy: Option<(bool, bool, Option<String>)> = sqlx::query_as(
        "SELECT auto_close_on_burst, has_valve, gateway_id FROM meters WHERE meter_id = $1",
    )
    .bind(meter)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("reading the meter's policy"))?;
    let (auto, has_valve, gateway) = policy.unwrap_or((false, false, None));
    let inputs = json!({
        "alarm_id": alarm_id, "alarm_raised_at": rfc3339(raised_at), "alarm_detail": detail,
        "auto_close_on_burst": auto, "has_valve": has_valve, "gateway": gateway,
    });
    let refuse = |reason: &str| Decision {
        rule: BURST_RULE.into(),
        meter: meter.to_owned(),
        outcome: "refused".into(),
        reason: reason.to_owned(),
        inputs: inputs.clone(),
        command: None,
    };
    let refusal = if !has_valve {
        Some(refuse("the meter has no valve"))
    } else if !auto {
        Some(refuse("registry policy auto_close_on_burst is off"))
    } else {
        None
    };
    if let Some(d) = refusal {
        decide(&mut tx, &d).await?;
        tx.commit().await.map_err(db("committing a decision"))?;
        return Ok(Some((d, None)));
    }
    let mut req = IssueRequest::new(
        format!("burst-{alarm_id}"),
        meter_id(meter)?,
        CommandAction::ValveClose,
        format!("rule:{BURST_RULE}"),
        format!("burst alarm {alarm_id} raised {raised_at}: valve closed by registry policy"),
    );
    req.priority = PRIORITY_BURST;
    req.cause = json!({"rule": BURST_RULE, "alarm_id": alarm_id, "inputs": inputs});
    let issued = super::issue_in(&mut tx, &req, true).await?;
    let d = Decision {
        rule: BURST_RULE.into(),
        meter: meter.to_owned(),
        outcome: "issued".into(),
        reason: "confirmed burst alarm and auto_close_on_burst".into(),
        inputs,
        command: Some(issued.command.id.clone()),
    };
    decide(&mut tx, &d).await?;
    tx.commit().await.map_err(db("committing a burst close"))?;
    Ok(Some((d, Some(issued))))
}

/// Open burst alarms with no decision yet: what a sweep feeds to [`burst_auto_close`] when an
/// alarm message was missed (service down at the time).
///
/// # Errors
/// Database errors.
pub async fn undecided_bursts(pool: &PgPool) -> Result<Vec<String>, ControlError> {
    sqlx::query_scalar(
        "SELECT a.meter_id FROM alarms a WHERE a.kind = 'burst' AND a.cleared_at IS NULL \
         AND NOT EXISTS (SELECT 1 FROM control_decisions d WHERE d.rule = $1 \
             AND d.meter_id = a.meter_id AND (d.inputs->>'alarm_id')::bigint = a.alarm_id)",
    )
    .bind(BURST_RULE)
    .fetch_all(pool)
    .await
    .map_err(db("finding undecided burst alarms"))
}

/// Settings of the arrears rule.
#[derive(Debug, Clone)]
pub struct ArrearsPolicy {
    /// Time between the advance notice and the earliest close (DOMAIN.md: regional rules
    /// quote 5 days).
    pub notice_period: time::Duration,
    /// More eligible closes than this in one run wait for a person's approval.
    pub bulk_threshold: usize,
    /// Working days and hours.
    pub calendar: Calendar,
}

impl ArrearsPolicy {
    /// 5 days' notice, bulk approval above 20 closes, the shipped calendar.
    ///
    /// # Errors
    /// Only if the shipped calendar is broken.
    pub fn default_policy() -> Result<Self, ControlError> {
        Ok(Self {
            notice_period: time::Duration::days(5),
            bulk_threshold: 20,
            calendar: Calendar::builtin()?,
        })
    }
}

/// Which notice (DOMAIN.md §3: a payment demand, then advance notice of the close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// 催缴: the demand for payment.
    PaymentDemand,
    /// 停水预告: advance notice that supply will be suspended.
    AdvanceNotice,
}

impl NoticeKind {
    /// Column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PaymentDemand => "payment_demand",
            Self::AdvanceNotice => "advance_notice",
        }
    }
}

/// Records that a notice was sent to the customer of `meter` at `sent_at`.
///
/// # Errors
/// Database errors (an unknown meter is refused by the foreign key).
pub async fn record_notice(
    pool: &PgPool,
    meter: &str,
    kind: NoticeKind,
    sent_at: OffsetDateTime,
    by: &str,
) -> Result<(), ControlError> {
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    sqlx::query(
        "INSERT INTO arrears_notices (meter_id, kind, sent_at, recorded_by) VALUES ($1, $2, $3, $4)",
    )
    .bind(meter)
    .bind(kind.as_str())
    .bind(sent_at)
    .bind(by)
    .execute(&mut *tx)
    .await
    .map_err(db("recording a notice"))?;
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail) \
         VALUES ($1, 'arrears.notice', 'meter', $2, $3)",
    )
    .bind(by)
    .bind(meter)
    .bind(json!({"kind": kind.as_str(), "sent_at": rfc3339(sent_at)}))
    .execute(&mut *tx)
    .await
    .map_err(db("writing the audit log"))?;
    tx.commit().await.map_err(db("committing a notice"))?;
    Ok(())
}

/// The facts one arrears decision is taken on.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrearsFacts {
    /// The meter.
    pub meter: String,
    /// Revenue-system account.
    pub account: String,
    /// Yuan overdue.
    pub amount_overdue: Decimal,
    /// Overdue since (local date).
    pub overdue_since: Date,
    /// Registry: the meter has a valve.
    pub has_valve: bool,
    /// Registry: protected customer (medical, elderly alone).
    pub protected: bool,
    /// Latest payment demand sent on or after the overdue date.
    pub payment_demand_at: Option<OffsetDateTime>,
    /// Latest advance notice sent on or after the payment demand.
    pub advance_notice_at: Option<OffsetDateTime>,
    /// A person approved this close after a bulk hold.
    pub approved_by: Option<String>,
}

/// What the arrears rule says about one meter now (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrearsVerdict {
    /// Never closed: the reason.
    Refused(String),
    /// Not now: the reason (night, holiday, notice period running).
    Deferred(String),
    /// May be closed now.
    Eligible,
}

/// The arrears safeguards of DOMAIN.md §3, in order: valve, protected customer, payment
/// demand, advance notice, notice period elapsed, working day, working hours.
pub fn evaluate(
    facts: &ArrearsFacts,
    policy: &ArrearsPolicy,
    now: OffsetDateTime,
) -> ArrearsVerdict {
    if !facts.has_valve {
        return ArrearsVerdict::Refused("the meter has no valve".into());
    }
    if facts.protected {
        return ArrearsVerdict::Refused(
            "protected customer: never valve-closed for arrears".into(),
        );
    }
    let Some(demand) = facts.payment_demand_at else {
        return ArrearsVerdict::Refused(
            "no payment demand recorded since the arrears began".into(),
        );
    };
    let Some(notice) = facts.advance_notice_at.filter(|n| *n >= demand) else {
        return ArrearsVerdict::Refused(
            "no advance notice recorded after the payment demand".into(),
        );
    };
    let earliest = notice + policy.notice_period;
    if now < earliest {
        return ArrearsVerdict::Deferred(format!(
            "notice period not elapsed: advance notice {notice}, earliest close {earliest}"
        ));
    }
    if let Err(off) = policy.calendar.working_time(now) {
        return ArrearsVerdict::Deferred(format!(
            "{}: closes only in working hours on working days",
            off.as_str()
        ));
    }
    ArrearsVerdict::Eligible
}

/// What one arrears run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArrearsReport {
    /// Decisions stored in this run (unchanged repeats are not stored again).
    pub decisions: Vec<Decision>,
    /// Close commands issued.
    pub closed: Vec<String>,
    /// Reopen commands issued (arrears cleared).
    pub reopened: Vec<String>,
}

/// The latest arrears-rule command of each meter with its state.
async fn latest_arrears_commands(
    tx: &mut PgConnection,
) -> Result<Vec<(String, String, String, String)>, ControlError> {
    sqlx::query_as(
        "SELECT DISTINCT ON (device_id) device_id, command_id, cause->>'rule', state \
         FROM commands WHERE cause->>'rule' IN ($1, $2) \
         ORDER BY device_id, issued_at DESC, command_id DESC",
    )
    .bind(ARREARS_CLOSE)
    .bind(ARREARS_REOPEN)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading arrears commands"))
}

fn closed_by_rule(state: &str) -> bool {
    !matches!(state, "failed" | "expired" | "cancelled")
}

/// Reopens at once, with the highest priority, every valve the arrears rule closed whose
/// arrears have been cleared (payment). Not bound to working hours.
///
/// # Errors
/// Database errors and the errors of [`super::issue`].
pub async fn arrears_reopen(pool: &PgPool) -> Result<ArrearsReport, ControlError> {
    let mut report = ArrearsReport::default();
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let latest = latest_arrears_commands(&mut tx).await?;
    for (meter, close_id, rule, state) in latest {
        if rule != ARREARS_CLOSE || !closed_by_rule(&state) {
            continue;
        }
        let owing: Option<Decimal> =
            sqlx::query_scalar("SELECT amount_overdue FROM arrears WHERE meter_id = $1")
                .bind(&meter)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("reading arrears"))?;
        if owing.is_some() {
            continue;
        }
        let inputs = json!({"close_command": close_id, "close_state": state, "arrears": "cleared"});
        let mut req = IssueRequest::new(
            format!("arrears-reopen:{close_id}"),
            meter_id(&meter)?,
            CommandAction::ValveOpen,
            format!("rule:{ARREARS_REOPEN}"),
            "arrears cleared (payment): supply restored at once",
        );
        req.priority = PRIORITY_HIGHEST;
        req.parent = None;
        req.cause = json!({"rule": ARREARS_REOPEN, "close_command": close_id, "inputs": inputs});
        let issued = super::issue_in(&mut tx, &req, true).await?;
        let d = Decision {
            rule: ARREARS_REOPEN.into(),
            meter: meter.clone(),
            outcome: "issued".into(),
            reason: "arrears cleared".into(),
            inputs,
            command: Some(issued.command.id.clone()),
        };
        decide(&mut tx, &d).await?;
        report.reopened.push(issued.command.id);
        report.decisions.push(d);
    }
    tx.commit().await.map_err(db("committing reopens"))?;
    Ok(report)
}

/// One arrears run at `now`: every meter in arrears is evaluated by [`evaluate`]; eligible
/// ones are closed unless there are more than the bulk threshold, in which case the
/// unapproved ones wait for [`approve_arrears`]. Meters already closed by the rule are
/// skipped. Reopens after payment run first ([`arrears_reopen`]).
///
/// # Errors
/// Database errors and the errors of [`super::issue`].
pub async fn arrears_run(
    pool: &PgPool,
    policy: &ArrearsPolicy,
    now: OffsetDateTime,
) -> Result<ArrearsReport, ControlError> {
    let mut report = arrears_reopen(pool).await?;
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let closed: std::collections::HashSet<String> = latest_arrears_commands(&mut tx)
        .await?
        .into_iter()
        .filter(|(_, _, rule, state)| rule == ARREARS_CLOSE && closed_by_rule(state))
        .map(|(m, ..)| m)
        .collect();
    type Row = (String, String, Decimal, Date, bool, bool);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT a.meter_id, a.account_id, a.amount_overdue, a.overdue_since, m.has_valve, \
                m.protected_customer \
         FROM arrears a JOIN meters m USING (meter_id) ORDER BY a.meter_id",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading arrears"))?;
    let mut eligible = Vec::new();
    for (meter, account, amount, since, has_valve, protected) in rows {
        if closed.contains(&meter) {
            continue;
        }
        let since_ts = since.midnight().assume_offset(policy.calendar.offset());
        let demand: Option<OffsetDateTime> = sqlx::query_scalar(
            "SELECT max(sent_at) FROM arrears_notices \
             WHERE meter_id = $1 AND kind = 'payment_demand' AND sent_at >= $2",
        )
        .bind(&meter)
        .bind(since_ts)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("reading payment demands"))?;
        let notice: Option<OffsetDateTime> = sqlx::query_scalar(
            "SELECT max(sent_at) FROM arrears_notices \
             WHERE meter_id = $1 AND kind = 'advance_notice' AND sent_at >= $2",
        )
        .bind(&meter)
        .bind(since_ts)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("reading advance notices"))?;
        // An approval counts when it is the latest word on a bulk hold.
        let approval: Option<(String, Value)> = sqlx::query_as(
            "SELECT outcome, inputs FROM control_decisions WHERE meter_id = $1 AND rule = $2 \
             ORDER BY at DESC, decision_id DESC LIMIT 1",
        )
        .bind(&meter)
        .bind(ARREARS_CLOSE)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reading approvals"))?;
        let approved_by = approval
            .filter(|(o, _)| o == "approved")
            .and_then(|(_, i)| i.get("approver").and_then(Value::as_str).map(str::to_owned));
        let facts = ArrearsFacts {
            meter: meter.clone(),
            account,
            amount_overdue: amount,
            overdue_since: since,
            has_valve,
            protected,
            payment_demand_at: demand,
            advance_notice_at: notice,
            approved_by,
        };
        let inputs = json!({
            "account": facts.account, "amount_overdue": facts.amount_overdue,
            "overdue_since": facts.overdue_since.to_string(), "has_valve": has_valve,
            "protected_customer": protected, "payment_demand_at": demand.map(rfc3339),
            "advance_notice_at": notice.map(rfc3339),
            "notice_period_s": policy.notice_period.whole_seconds(), "now": rfc3339(now),
            "local_time": now.to_offset(policy.calendar.offset()).to_string(),
            "approved_by": facts.approved_by,
        });
        let decision = |outcome: &str, reason: String| Decision {
            rule: ARREARS_CLOSE.into(),
            meter: meter.clone(),
            outcome: outcome.into(),
            reason,
            inputs: inputs.clone(),
            command: None,
        };
        match evaluate(&facts, policy, now) {
            ArrearsVerdict::Refused(r) => {
                let d = decision("refused", r);
                if decide(&mut tx, &d).await? {
                    report.decisions.push(d);
                }
            }
            ArrearsVerdict::Deferred(r) => {
                let d = decision("deferred", r);
                if decide(&mut tx, &d).await? {
                    report.decisions.push(d);
                }
            }
            ArrearsVerdict::Eligible => eligible.push((facts, inputs)),
        }
    }
    let unapproved = eligible
        .iter()
        .filter(|(f, _)| f.approved_by.is_none())
        .count();
    let hold = unapproved > policy.bulk_threshold;
    for (facts, inputs) in eligible {
        let mut inputs = inputs;
        inputs["eligible_unapproved"] = json!(unapproved);
        inputs["bulk_threshold"] = json!(policy.bulk_threshold);
        if hold && facts.approved_by.is_none() {
            let d = Decision {
                rule: ARREARS_CLOSE.into(),
                meter: facts.meter.clone(),
                outcome: "awaiting_approval".into(),
                reason: format!(
                    "bulk close of {unapproved} meters is above the threshold {}: a person must approve",
                    policy.bulk_threshold
                ),
                inputs,
                command: None,
            };
            if decide(&mut tx, &d).await? {
                report.decisions.push(d);
            }
            continue;
        }
        let earlier: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM commands WHERE device_id = $1 AND cause->>'rule' = $2",
        )
        .bind(&facts.meter)
        .bind(ARREARS_CLOSE)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("counting earlier closes"))?;
        let mut req = IssueRequest::new(
            format!(
                "arrears-close:{}:{}:{}",
                facts.meter, facts.overdue_since, earlier
            ),
            meter_id(&facts.meter)?,
            CommandAction::ValveClose,
            format!("rule:{ARREARS_CLOSE}"),
            format!(
                "arrears of {} yuan since {}: notices given, period elapsed",
                facts.amount_overdue, facts.overdue_since
            ),
        );
        req.priority = PRIORITY_ARREARS;
        req.approver = facts.approved_by.clone();
        req.cause = json!({"rule": ARREARS_CLOSE, "inputs": inputs});
        let issued = super::issue_in(&mut tx, &req, true).await?;
        let d = Decision {
            rule: ARREARS_CLOSE.into(),
            meter: facts.meter.clone(),
            outcome: "issued".into(),
            reason: "all safeguards met".into(),
            inputs,
            command: Some(issued.command.id.clone()),
        };
        decide(&mut tx, &d).await?;
        report.closed.push(issued.command.id);
        report.decisions.push(d);
    }
    tx.commit().await.map_err(db("committing an arrears run"))?;
    Ok(report)
}

/// A person approves the arrears closes held for bulk approval (all held ones, or the listed
/// meters). The closes are issued by the next [`arrears_run`], which checks every safeguard
/// again (so an approval given at night still closes only in working hours). Returns the
/// approved meters.
///
/// # Errors
/// [`ControlError::Invalid`] without an approver; database errors.
pub async fn approve_arrears(
    pool: &PgPool,
    approver: &str,
    meters: Option<&[String]>,
) -> Result<Vec<String>, ControlError> {
    if approver.trim().is_empty() {
        return Err(ControlError::Invalid(
            "an approval names its approver".into(),
        ));
    }
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let held: Vec<String> = sqlx::query_scalar(
        "SELECT meter_id FROM (SELECT DISTINCT ON (meter_id) meter_id, outcome \
             FROM control_decisions WHERE rule = $1 ORDER BY meter_id, at DESC, decision_id DESC) d \
         WHERE outcome = 'awaiting_approval' ORDER BY meter_id",
    )
    .bind(ARREARS_CLOSE)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading held closes"))?;
    let approved: Vec<String> = held
        .into_iter()
        .filter(|m| meters.is_none_or(|list| list.contains(m)))
        .collect();
    for m in &approved {
        let d = Decision {
            rule: ARREARS_CLOSE.into(),
            meter: m.clone(),
            outcome: "approved".into(),
            reason: format!("bulk close approved by {approver}"),
            inputs: json!({"approver": approver}),
            command: None,
        };
        decide(&mut tx, &d).await?;
    }
    tx.commit().await.map_err(db("committing approvals"))?;
    Ok(approved)
}
