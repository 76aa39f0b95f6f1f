//! The central command service (docs/control.md): commands to valves, hydrants and meters as
//! rows of `commands` with their history in `command_events`, published to the serving gateway
//! by the control service ([`service`]) and moved through [`CentralState`] by the gateways'
//! acks and by later telemetry.
//!
//! Everything here is a library function over the database, so the API (and the CLI
//! `pipeline control …`) issue and cancel commands without an MQTT connection: a new row is an
//! outbox entry that the service publishes (it LISTENs on `wm_control`). Rules live in
//! [`rules`], hydrant permits in [`hydrant`], the working-day calendar in [`calendar`].

pub mod calendar;
pub mod hydrant;
pub mod rules;
pub mod service;
mod state;

use model::{CommandAck, CommandAction, CommandId, CommandState, MeterId};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};
use time::OffsetDateTime;

pub use state::{CentralState, next_state};

/// Most pending (queued, sent, delivered) commands one device may have (DOMAIN.md §3).
pub const MAX_PENDING_PER_DEVICE: i64 = 20;
/// Default lifetime of a command: sleepy NB-IoT meters hear downlink only after an uplink.
pub const DEFAULT_TTL: time::Duration = time::Duration::hours(48);
/// Most retries of one command (each a new id linked to its parent).
pub const MAX_RETRIES: i16 = 3;
/// Highest priority: reopening a valve after payment, cancels.
pub const PRIORITY_HIGHEST: u8 = 9;
/// Priority of a burst auto-close.
pub const PRIORITY_BURST: u8 = 8;
/// Default priority of an operator's command.
pub const PRIORITY_DEFAULT: u8 = 5;
/// Priority of an arrears close.
pub const PRIORITY_ARREARS: u8 = 3;

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A query failed.
    #[error("database error while {what}: {source}")]
    Db {
        /// What was being done.
        what: &'static str,
        /// Underlying error.
        source: sqlx::Error,
    },
    /// A query of the database layer failed (reads of stored readings).
    #[error(transparent)]
    Store(#[from] crate::db::StoreError),
    /// The device is not in the meter registry.
    #[error("device `{0}` is not in the meter registry (register it first)")]
    UnknownDevice(String),
    /// The registry names no gateway for the device.
    #[error("device `{0}` has no serving gateway in the registry (meters.gateway_id is empty)")]
    NoGateway(String),
    /// The device class cannot execute the action.
    #[error("device `{device}` cannot execute `{action}`: {why}")]
    Unsupported {
        /// The device.
        device: String,
        /// The action's wire name.
        action: String,
        /// Why not.
        why: String,
    },
    /// The per-device bound of pending commands is reached.
    #[error(
        "device `{device}` already has {pending} pending commands (at most {MAX_PENDING_PER_DEVICE}); command `{id}` refused"
    )]
    TooManyPending {
        /// The device.
        device: String,
        /// Pending now.
        pending: i64,
        /// The refused command.
        id: String,
    },
    /// The id exists for another device or action (an idempotency key reused for something else).
    #[error("command id `{id}` already exists for {existing}; expected the same device and action")]
    IdConflict {
        /// The id.
        id: String,
        /// What the existing command is.
        existing: String,
    },
    /// No such command.
    #[error("command `{0}` does not exist")]
    NotFound(String),
    /// The command is in a state the operation does not apply to.
    #[error("command `{id}` is `{state}`: {why}")]
    BadState {
        /// The command.
        id: String,
        /// Its state.
        state: String,
        /// What was expected.
        why: &'static str,
    },
    /// The retry bound is reached.
    #[error("command `{id}` is already retry {attempt}; at most {MAX_RETRIES} retries")]
    RetryLimit {
        /// The command asked to be retried.
        id: String,
        /// Its attempt number.
        attempt: i16,
    },
    /// A request field is invalid.
    #[error("invalid command request: {0}")]
    Invalid(String),
    /// A hydrant permit forbids the operation.
    #[error("hydrant `{hydrant}`: {why}")]
    Permit {
        /// The hydrant.
        hydrant: String,
        /// Why.
        why: String,
    },
    /// The holiday calendar file is unreadable or wrong.
    #[error("holiday calendar {path}: {why}")]
    Calendar {
        /// The file.
        path: String,
        /// What is wrong, with the line where known.
        why: String,
    },
    /// The broker could not be reached or configured.
    #[error("MQTT: {0}")]
    Mqtt(String),
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> ControlError {
    move |source| ControlError::Db { what, source }
}

/// An instant as RFC 3339 text, the form stored in decision inputs and causes.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// The wire name of an action (`valve_close`, `hydrant_unlock`, …).
pub fn action_name(action: &CommandAction) -> String {
    serde_json::to_value(action)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// A request to issue a command.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// Idempotency key: issuing the same id again returns the existing command.
    pub id: CommandId,
    /// Target device (a registry meter id).
    pub device: MeterId,
    /// What to do.
    pub action: CommandAction,
    /// Who: `user:<name>` or `rule:<rule>`.
    pub issued_by: String,
    /// Why, in words.
    pub reason: String,
    /// The alarm, bill or rule decision behind it (JSON object).
    pub cause: Value,
    /// 0..=9, 9 most urgent; the service publishes higher priorities first.
    pub priority: u8,
    /// Who approved it, where approval is required (bulk arrears closes).
    pub approver: Option<String>,
    /// The command this one retries or cancels.
    pub parent: Option<CommandId>,
    /// Lifetime from now.
    pub ttl: time::Duration,
}

impl IssueRequest {
    /// A request with default priority, TTL and no cause.
    pub fn new(
        id: impl Into<String>,
        device: MeterId,
        action: CommandAction,
        issued_by: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            id: CommandId(id.into()),
            device,
            action,
            issued_by: issued_by.into(),
            reason: reason.into(),
            cause: json!({}),
            priority: PRIORITY_DEFAULT,
            approver: None,
            parent: None,
            ttl: DEFAULT_TTL,
        }
    }
}

/// A stored command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRow {
    /// Idempotency key.
    pub id: String,
    /// Serving gateway at issue time.
    pub gateway: String,
    /// Target device.
    pub device: String,
    /// The action (wire JSON).
    pub action: CommandAction,
    /// Current state.
    pub state: CentralState,
    /// Reason of the last failure, or other detail of the state.
    pub state_detail: Option<Value>,
    /// Issuer.
    pub issued_by: String,
    /// Reason given.
    pub reason: String,
    /// Cause (alarm, bill, rule decision).
    pub cause: Value,
    /// Priority 0..=9.
    pub priority: i16,
    /// Approver.
    pub approver: Option<String>,
    /// Parent (retried or cancelled command).
    pub parent: Option<String>,
    /// Retry number (0 for an original).
    pub attempt: i16,
    /// The newer command that superseded this one.
    pub superseded_by: Option<String>,
    /// Issue time.
    pub issued_at: OffsetDateTime,
    /// Expiry.
    pub expires_at: OffsetDateTime,
    /// When the service published it (outbox mark).
    pub published_at: Option<OffsetDateTime>,
}

const ROW_COLUMNS: &str = "command_id, gateway_id, device_id, action, state, state_detail, \
    issued_by, reason, cause, priority, approver, parent_id, attempt, superseded_by, issued_at, \
    expires_at, published_at";

fn row_of(r: &sqlx::postgres::PgRow) -> Result<CommandRow, ControlError> {
    let get = |e: sqlx::Error| ControlError::Db {
        what: "reading a command row",
        source: e,
    };
    let state: String = r.try_get("state").map_err(get)?;
    let action: Value = r.try_get("action").map_err(get)?;
    let id: String = r.try_get("command_id").map_err(get)?;
    Ok(CommandRow {
        action: serde_json::from_value(action).map_err(|e| {
            ControlError::Invalid(format!("stored action of `{id}` is unreadable: {e}"))
        })?,
        state: CentralState::parse(&state).ok_or_else(|| {
            ControlError::Invalid(format!("stored state `{state}` of `{id}` is unknown"))
        })?,
        gateway: r.try_get("gateway_id").map_err(get)?,
        device: r.try_get("device_id").map_err(get)?,
        state_detail: r.try_get("state_detail").map_err(get)?,
        issued_by: r.try_get("issued_by").map_err(get)?,
        reason: r.try_get("reason").map_err(get)?,
        cause: r.try_get("cause").map_err(get)?,
        priority: r.try_get("priority").map_err(get)?,
        approver: r.try_get("approver").map_err(get)?,
        parent: r.try_get("parent_id").map_err(get)?,
        attempt: r.try_get("attempt").map_err(get)?,
        superseded_by: r.try_get("superseded_by").map_err(get)?,
        issued_at: r.try_get("issued_at").map_err(get)?,
        expires_at: r.try_get("expires_at").map_err(get)?,
        published_at: r.try_get("published_at").map_err(get)?,
        id,
    })
}

/// One command.
///
/// # Errors
/// [`ControlError::NotFound`], database errors.
pub async fn get(pool: &PgPool, id: &str) -> Result<CommandRow, ControlError> {
    let r = sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM commands WHERE command_id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(db("reading a command"))?
    .ok_or_else(|| ControlError::NotFound(id.to_owned()))?;
    row_of(&r)
}

/// The command with id `id`, if there is one, read on `conn` (inside the caller's transaction).
async fn find_in(conn: &mut PgConnection, id: &str) -> Result<Option<CommandRow>, ControlError> {
    sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM commands WHERE command_id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("looking up the command id"))?
    .map(|r| row_of(&r))
    .transpose()
}

/// The commands of a device, newest first (at most `limit`).
///
/// # Errors
/// Database errors.
pub async fn list(
    pool: &PgPool,
    device: &str,
    limit: i64,
) -> Result<Vec<CommandRow>, ControlError> {
    sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM commands WHERE device_id = $1 \
         ORDER BY issued_at DESC, command_id DESC LIMIT $2"
    ))
    .bind(device)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(db("listing commands"))?
    .iter()
    .map(row_of)
    .collect()
}

/// One entry of a command's history.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandEvent {
    /// When (the gateway's time for acks, the centre's for its own events).
    pub at: OffsetDateTime,
    /// State name, or `superseded` / `retried`.
    pub state: String,
    /// Who reported it and why.
    pub detail: Option<Value>,
}

/// The history of a command, oldest first.
///
/// # Errors
/// Database errors.
pub async fn events(pool: &PgPool, id: &str) -> Result<Vec<CommandEvent>, ControlError> {
    let rows: Vec<(OffsetDateTime, String, Option<Value>)> = sqlx::query_as(
        "SELECT at, state, detail FROM command_events WHERE command_id = $1 ORDER BY at, state",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .map_err(db("reading command events"))?;
    Ok(rows
        .into_iter()
        .map(|(at, state, detail)| CommandEvent { at, state, detail })
        .collect())
}

/// What [`issue`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Issued {
    /// The command (new, or the existing one with this id).
    pub command: CommandRow,
    /// False when the id existed already (idempotent re-issue: nothing new happens).
    pub created: bool,
    /// Older queued valve commands this one supersedes.
    pub superseded: Vec<String>,
}

/// Issues a command: validates it against the registry (serving gateway, device class), bounds
/// the device's pending commands, supersedes older queued valve commands, and writes the row
/// (the control service publishes it). Idempotent by id. Hydrant unlocks go through
/// [`hydrant::unlock`] (only inside a permit); cancels through [`cancel`].
///
/// # Errors
/// [`ControlError`] naming the refused field or bound.
pub async fn issue(pool: &PgPool, req: &IssueRequest) -> Result<Issued, ControlError> {
    match req.action {
        CommandAction::HydrantUnlock { .. } => {
            return Err(ControlError::Permit {
                hydrant: req.device.to_string(),
                why: "a hydrant is unlocked only inside an active permit (`control permit unlock`)"
                    .into(),
            });
        }
        CommandAction::Cancel { .. } => {
            return Err(ControlError::Invalid(
                "cancel a command with `cancel`, not by issuing a cancel action".into(),
            ));
        }
        _ => {}
    }
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let out = issue_in(&mut tx, req, true).await?;
    tx.commit().await.map_err(db("committing a command"))?;
    Ok(out)
}

/// [`issue`] inside a caller's transaction; `bounded` applies the pending bound (cancels are
/// exempt: they reduce the queue).
pub(crate) async fn issue_in(
    tx: &mut PgConnection,
    req: &IssueRequest,
    bounded: bool,
) -> Result<Issued, ControlError> {
    if req.priority > PRIORITY_HIGHEST {
        return Err(ControlError::Invalid(format!(
            "priority {} is out of range 0..=9",
            req.priority
        )));
    }
    if req.id.0.is_empty() || req.id.0.len() > 200 {
        return Err(ControlError::Invalid(
            "command id must be 1..=200 characters".into(),
        ));
    }
    if req.ttl <= time::Duration::ZERO {
        return Err(ControlError::Invalid("TTL must be positive".into()));
    }
    let device = req.device.as_str();
    // One writer per device at a time: the pending count and supersession see a stable queue.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('wm_control:' || $1))")
        .bind(device)
        .execute(&mut *tx)
        .await
        .map_err(db("locking the device's commands"))?;
    let action_json = serde_json::to_value(&req.action)
        .map_err(|e| ControlError::Invalid(format!("action: {e}")))?;
    if let Some(existing) = find_in(tx, &req.id.0).await? {
        if existing.device != device || existing.action != req.action {
            return Err(ControlError::IdConflict {
                id: req.id.0.clone(),
                existing: format!(
                    "`{}` on `{}`",
                    action_name(&existing.action),
                    existing.device
                ),
            });
        }
        return Ok(Issued {
            command: existing,
            created: false,
            superseded: Vec::new(),
        });
    }
    let meter: Option<(Option<String>, bool, String)> =
        sqlx::query_as("SELECT gateway_id, has_valve, status FROM meters WHERE meter_id = $1")
            .bind(device)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("reading the registry"))?;
    let (gateway, has_valve, status) =
        meter.ok_or_else(|| ControlError::UnknownDevice(device.to_owned()))?;
    let gateway = gateway
        .filter(|g| !g.is_empty())
        .ok_or_else(|| ControlError::NoGateway(device.to_owned()))?;
    let unsupported = |why: &str| ControlError::Unsupported {
        device: device.to_owned(),
        action: action_name(&req.action),
        why: why.to_owned(),
    };
    if matches!(status.as_str(), "retired" | "replaced" | "in_stock") {
        return Err(unsupported(&format!("the meter is `{status}`")));
    }
    let is_hydrant = device.starts_with("hydrant:");
    match &req.action {
        CommandAction::ValveOpen | CommandAction::ValveClose if !has_valve => {
            return Err(unsupported("the registry says it has no valve (has_valve)"));
        }
        CommandAction::HydrantUnlock { .. } | CommandAction::HydrantLock if !is_hydrant => {
            return Err(unsupported(
                "only hydrants (`hydrant:<id>`) have an outlet lock",
            ));
        }
        CommandAction::ModbusWrite { .. } if !device.starts_with("modbus:") => {
            return Err(unsupported("only Modbus devices take register writes"));
        }
        CommandAction::MbusApplicationReset | CommandAction::SetTime
            if !device.starts_with("mbus:") =>
        {
            return Err(unsupported(
                "only wired M-Bus meters take resets and clock setting",
            ));
        }
        CommandAction::ReadNow
            if !(device.starts_with("modbus:") || device.starts_with("mbus:")) =>
        {
            return Err(unsupported(
                "only polled field-bus devices (modbus:, mbus:) can be read on demand; NB-IoT \
                 and wM-Bus meters transmit only when they wake",
            ));
        }
        CommandAction::Cancel { .. } if req.parent.is_none() => {
            return Err(ControlError::Invalid(
                "a cancel names its target as parent".into(),
            ));
        }
        _ => {}
    }
    // Older valve commands still waiting are superseded by this one (both stay recorded).
    let superseded: Vec<(String, Option<OffsetDateTime>)> = if req.action.is_valve() {
        sqlx::query_as(
            "SELECT command_id, published_at FROM commands \
             WHERE device_id = $1 AND state = 'queued' AND superseded_by IS NULL \
               AND action->>'type' IN ('valve_open', 'valve_close') ORDER BY issued_at",
        )
        .bind(device)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("finding superseded commands"))?
    } else {
        Vec::new()
    };
    if bounded {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM commands WHERE device_id = $1 \
             AND state IN ('queued', 'sent', 'delivered') AND superseded_by IS NULL",
        )
        .bind(device)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("counting pending commands"))?;
        let pending = pending - superseded.len() as i64;
        if pending >= MAX_PENDING_PER_DEVICE {
            return Err(ControlError::TooManyPending {
                device: device.to_owned(),
                pending,
                id: req.id.0.clone(),
            });
        }
    }
    let now = OffsetDateTime::now_utc();
    let attempt: i16 = match &req.parent {
        Some(p) if !matches!(req.action, CommandAction::Cancel { .. }) => {
            let a: Option<i16> =
                sqlx::query_scalar("SELECT attempt FROM commands WHERE command_id = $1")
                    .bind(&p.0)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db("reading the parent command"))?;
            a.ok_or_else(|| ControlError::NotFound(p.0.clone()))? + 1
        }
        _ => 0,
    };
    sqlx::query(
        "INSERT INTO commands (command_id, gateway_id, device_id, action, state, issued_by, \
             issued_at, expires_at, reason, cause, priority, approver, parent_id, attempt) \
         VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(&req.id.0)
    .bind(&gateway)
    .bind(device)
    .bind(&action_json)
    .bind(&req.issued_by)
    .bind(now)
    .bind(now + req.ttl)
    .bind(&req.reason)
    .bind(&req.cause)
    .bind(i16::from(req.priority))
    .bind(&req.approver)
    .bind(req.parent.as_ref().map(|p| &p.0))
    .bind(attempt)
    .execute(&mut *tx)
    .await
    .map_err(db("inserting a command"))?;
    event(
        tx,
        &req.id.0,
        now,
        "queued",
        json!({"by": "centre", "issued_by": req.issued_by}),
    )
    .await?;
    for (old, published) in &superseded {
        // Not yet published: withdrawn here. Published: the gateway drops it from its NB-IoT
        // queue when the newer one arrives and reports it cancelled.
        let state_sql = if published.is_none() {
            "state = 'cancelled', state_detail = $3, "
        } else {
            ""
        };
        sqlx::query(&format!(
            "UPDATE commands SET {state_sql}superseded_by = $2, updated_at = now() \
             WHERE command_id = $1"
        ))
        .bind(old)
        .bind(&req.id.0)
        .bind(json!({"superseded_by": req.id.0}))
        .execute(&mut *tx)
        .await
        .map_err(db("marking a superseded command"))?;
        event(tx, old, now, "superseded", json!({"by": req.id.0})).await?;
    }
    audit(
        tx,
        &req.issued_by,
        "command.issue",
        &req.id.0,
        json!({"device": device, "action": action_json, "reason": req.reason, "cause": req.cause,
               "priority": req.priority, "approver": req.approver, "parent": req.parent}),
    )
    .await?;
    let r = sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM commands WHERE command_id = $1"
    ))
    .bind(&req.id.0)
    .fetch_one(&mut *tx)
    .await
    .map_err(db("reading the new command"))?;
    Ok(Issued {
        command: row_of(&r)?,
        created: true,
        superseded: superseded.into_iter().map(|(id, _)| id).collect(),
    })
}

async fn event(
    tx: &mut PgConnection,
    id: &str,
    at: OffsetDateTime,
    state: &str,
    detail: Value,
) -> Result<bool, ControlError> {
    let n = sqlx::query(
        "INSERT INTO command_events (command_id, at, state, detail) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(at)
    .bind(state)
    .bind(detail)
    .execute(&mut *tx)
    .await
    .map_err(db("recording a command event"))?
    .rows_affected();
    Ok(n == 1)
}

async fn audit(
    tx: &mut PgConnection,
    actor: &str,
    action: &str,
    id: &str,
    detail: Value,
) -> Result<(), ControlError> {
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail) \
         VALUES ($1, $2, 'command', $3, $4)",
    )
    .bind(actor)
    .bind(action)
    .bind(id)
    .bind(detail)
    .execute(&mut *tx)
    .await
    .map_err(db("writing the audit log"))?;
    Ok(())
}

/// What [`cancel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// Not yet published: withdrawn at the centre.
    Withdrawn,
    /// Published: a cancel command (this id) asks the gateway to drop it from its queue; the
    /// target becomes `cancelled` when the gateway reports so.
    Requested(String),
}

/// Cancels a pending command. Idempotent: a second cancel of the same command returns the
/// same cancel request.
///
/// # Errors
/// [`ControlError::NotFound`]; [`ControlError::BadState`] when it is no longer pending.
pub async fn cancel(pool: &PgPool, id: &str, by: &str) -> Result<Cancelled, ControlError> {
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let r = sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM commands WHERE command_id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("reading a command"))?
    .ok_or_else(|| ControlError::NotFound(id.to_owned()))?;
    let row = row_of(&r)?;
    let cancel_id = format!("{id}.cancel");
    if !row.state.is_pending() {
        return Err(ControlError::BadState {
            id: id.to_owned(),
            state: row.state.as_str().to_owned(),
            why: "only a queued, sent or delivered command can be cancelled",
        });
    }
    let now = OffsetDateTime::now_utc();
    let out = if row.published_at.is_none() {
        sqlx::query(
            "UPDATE commands SET state = 'cancelled', state_detail = $2, updated_at = now() \
             WHERE command_id = $1",
        )
        .bind(id)
        .bind(json!({"cancelled_by": by}))
        .execute(&mut *tx)
        .await
        .map_err(db("cancelling a command"))?;
        event(&mut tx, id, now, "cancelled", json!({"by": by})).await?;
        audit(&mut tx, by, "command.cancel", id, json!({})).await?;
        Cancelled::Withdrawn
    } else {
        let device = MeterId::new(row.device.clone())
            .map_err(|e| ControlError::Invalid(format!("stored device: {e}")))?;
        let mut req = IssueRequest::new(
            cancel_id.clone(),
            device,
            CommandAction::Cancel {
                command: CommandId(id.to_owned()),
            },
            by,
            format!("cancel `{id}`"),
        );
        req.priority = PRIORITY_HIGHEST;
        req.parent = Some(CommandId(id.to_owned()));
        req.ttl = (row.expires_at - now).max(time::Duration::minutes(1));
        issue_in(&mut tx, &req, false).await?;
        Cancelled::Requested(cancel_id)
    };
    tx.commit().await.map_err(db("committing a cancel"))?;
    Ok(out)
}

/// Retries a failed or expired command as a new id (`{id}-r`) linked to it — never the same
/// id again, so a valve cannot toggle twice. Idempotent; bounded by [`MAX_RETRIES`].
///
/// # Errors
/// [`ControlError::BadState`] unless the command failed or expired;
/// [`ControlError::RetryLimit`]; the errors of [`issue`].
pub async fn retry(pool: &PgPool, id: &str, by: &str) -> Result<Issued, ControlError> {
    let row = get(pool, id).await?;
    let retry_id = format!("{id}-r");
    if let Ok(existing) = get(pool, &retry_id).await {
        return Ok(Issued {
            command: existing,
            created: false,
            superseded: Vec::new(),
        });
    }
    if !matches!(row.state, CentralState::Failed | CentralState::Expired) {
        return Err(ControlError::BadState {
            id: id.to_owned(),
            state: row.state.as_str().to_owned(),
            why: "only a failed or expired command is retried",
        });
    }
    if row.attempt >= MAX_RETRIES {
        return Err(ControlError::RetryLimit {
            id: id.to_owned(),
            attempt: row.attempt,
        });
    }
    let device = MeterId::new(row.device.clone())
        .map_err(|e| ControlError::Invalid(format!("stored device: {e}")))?;
    let mut req = IssueRequest::new(retry_id, device, row.action.clone(), by, row.reason.clone());
    req.cause = row.cause.clone();
    req.priority = u8::try_from(row.priority).unwrap_or(PRIORITY_DEFAULT);
    req.approver = row.approver.clone();
    req.parent = Some(CommandId(id.to_owned()));
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let out = issue_in(&mut tx, &req, true).await?;
    event(
        &mut tx,
        id,
        OffsetDateTime::now_utc(),
        "retried",
        json!({"by": by, "retry": req.id.0}),
    )
    .await?;
    tx.commit().await.map_err(db("committing a retry"))?;
    Ok(out)
}

/// What an ack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The command is not ours (issued around the centre); nothing recorded.
    Unknown,
    /// Seen before (acks repeat by design); nothing recorded.
    Duplicate,
    /// Recorded; the state did not move (late or out-of-order ack).
    Recorded,
    /// Recorded and the command moved to this state.
    Moved(CentralState),
}

/// Records a gateway's ack in `command_events` (once per command, time and state, however
/// often it repeats) and moves the command's state by [`next_state`].
///
/// # Errors
/// Database errors.
pub async fn apply_ack(pool: &PgPool, ack: &CommandAck) -> Result<AckOutcome, ControlError> {
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let current: Option<String> =
        sqlx::query_scalar("SELECT state FROM commands WHERE command_id = $1 FOR UPDATE")
            .bind(&ack.id.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("reading a command's state"))?;
    let Some(current) = current.as_deref().and_then(CentralState::parse) else {
        return Ok(AckOutcome::Unknown);
    };
    let reported = CentralState::from_ack(&ack.state);
    let mut detail = json!({"by": "gateway", "gateway": ack.gateway});
    if let CommandState::Failed { reason } = &ack.state {
        detail["reason"] = json!(reason);
    }
    if !event(
        &mut tx,
        &ack.id.0,
        ack.at,
        reported.as_str(),
        detail.clone(),
    )
    .await?
    {
        return Ok(AckOutcome::Duplicate);
    }
    let out = match next_state(current, reported) {
        Some(next) => {
            sqlx::query(
                "UPDATE commands SET state = $2, state_detail = $3, updated_at = now(), \
                    acknowledged_at = CASE WHEN $2 = 'acknowledged' THEN $4 ELSE acknowledged_at END \
                 WHERE command_id = $1",
            )
            .bind(&ack.id.0)
            .bind(next.as_str())
            .bind(&detail)
            .bind(ack.at)
            .execute(&mut *tx)
            .await
            .map_err(db("moving a command's state"))?;
            AckOutcome::Moved(next)
        }
        None => AckOutcome::Recorded,
    };
    tx.commit().await.map_err(db("committing an ack"))?;
    Ok(out)
}

/// Expires pending commands whose TTL has passed at `now`; returns their ids.
///
/// # Errors
/// Database errors.
pub async fn expire_due(pool: &PgPool, now: OffsetDateTime) -> Result<Vec<String>, ControlError> {
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE commands SET state = 'expired', state_detail = '{\"by\": \"centre\"}', \
             updated_at = now() \
         WHERE state IN ('queued', 'sent', 'delivered') AND expires_at <= $1 \
         RETURNING command_id",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("expiring commands"))?;
    for id in &ids {
        event(&mut tx, id, now, "expired", json!({"by": "centre"})).await?;
    }
    tx.commit().await.map_err(db("committing expiries"))?;
    Ok(ids)
}

/// A telemetry verdict on an acknowledged command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryVerdict {
    /// The command.
    pub command: String,
    /// The device.
    pub device: String,
    /// Confirmed, or failed (a `valve_fault` alarm was raised).
    pub state: CentralState,
    /// What the reading showed.
    pub detail: String,
}

/// Hydrant status word bit of a locked outlet (`gateway::sources::hydrant::status_bits::LOCKED`;
/// the pipeline does not depend on the gateway crate).
const HYDRANT_LOCKED_BIT: i64 = 0x01;

/// Checks acknowledged valve and hydrant commands against the first later reading of the
/// device (`valve_state`: 0 open, 1 closed, 3 abnormal; a hydrant's status word lock bit):
/// the commanded state confirms the command; another state, or an abnormal valve, fails it
/// and raises a `valve_fault` alarm (published by the caller, see [`service`]).
///
/// # Errors
/// Database errors.
pub async fn confirm_by_telemetry(pool: &PgPool) -> Result<Vec<TelemetryVerdict>, ControlError> {
    let candidates: Vec<(String, String, Value, OffsetDateTime)> = sqlx::query_as(
        "SELECT command_id, device_id, action, acknowledged_at FROM commands \
         WHERE state = 'acknowledged' AND acknowledged_at IS NOT NULL \
           AND action->>'type' IN ('valve_open', 'valve_close', 'hydrant_lock', 'hydrant_unlock') \
         ORDER BY acknowledged_at LIMIT 1000",
    )
    .fetch_all(pool)
    .await
    .map_err(db("finding acknowledged commands"))?;
    let mut out = Vec::new();
    for (id, device, action, acked_at) in candidates {
        let Ok(action) = serde_json::from_value::<CommandAction>(action) else {
            continue;
        };
        let (quantity, expected): (&str, i64) = match action {
            CommandAction::ValveClose => ("valve_state", 1),
            CommandAction::ValveOpen => ("valve_state", 0),
            CommandAction::HydrantLock => ("status_word", 1),
            CommandAction::HydrantUnlock { .. } => ("status_word", 0),
            _ => continue,
        };
        // The reading's meter time may be off; the partition bound only has to be generous.
        let value =
            crate::db::readings::first_received_after(pool, &device, quantity, acked_at).await?;
        let Some(value) = value else { continue };
        let value = i64::try_from(value.trunc()).unwrap_or(-1);
        let (observed, abnormal) = if quantity == "valve_state" {
            (value, value == 3)
        } else {
            (value & HYDRANT_LOCKED_BIT, false)
        };
        let (state, detail) = if observed == expected && !abnormal {
            (
                CentralState::ConfirmedByTelemetry,
                format!("{quantity} = {value} after the command"),
            )
        } else if abnormal {
            (
                CentralState::Failed,
                format!("valve reported abnormal ({quantity} = {value}) after the command"),
            )
        } else {
            (
                CentralState::Failed,
                format!(
                    "telemetry contradicts the command: {quantity} = {value}, expected {expected}"
                ),
            )
        };
        let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
        let moved = sqlx::query(
            "UPDATE commands SET state = $2, state_detail = $3, updated_at = now() \
             WHERE command_id = $1 AND state = 'acknowledged'",
        )
        .bind(&id)
        .bind(state.as_str())
        .bind(json!({"by": "telemetry", "detail": detail}))
        .execute(&mut *tx)
        .await
        .map_err(db("confirming a command"))?
        .rows_affected();
        if moved == 1 {
            event(
                &mut tx,
                &id,
                OffsetDateTime::now_utc(),
                state.as_str(),
                json!({"by": "telemetry", "detail": detail}),
            )
            .await?;
            if state == CentralState::Failed {
                raise_alarm(
                    &mut tx,
                    &device,
                    "valve_fault",
                    OffsetDateTime::now_utc(),
                    json!({"command": id, "reason": detail}),
                )
                .await?;
            }
            out.push(TelemetryVerdict {
                command: id,
                device,
                state,
                detail,
            });
        }
        tx.commit().await.map_err(db("committing a verdict"))?;
    }
    Ok(out)
}

/// Raises an open alarm of `kind` on `meter` (critical) observed at `at`, or counts it again on
/// the open one when `at` is later than its last sighting (a sweep seeing the same reading twice
/// counts it once). Returns true when the alarm is new (to be published).
pub(crate) async fn raise_alarm(
    tx: &mut PgConnection,
    meter: &str,
    kind: &str,
    at: OffsetDateTime,
    detail: Value,
) -> Result<bool, ControlError> {
    let inserted: Option<bool> = sqlx::query_scalar(
        "INSERT INTO alarms (meter_id, kind, severity, raised_at, first_seen, last_seen, \
             occurrences, state, detail) \
         VALUES ($1, $2, 'critical', $3, $3, $3, 1, 'open', $4) \
         ON CONFLICT (meter_id, kind) WHERE cleared_at IS NULL DO UPDATE SET \
             occurrences = alarms.occurrences + 1, last_seen = EXCLUDED.last_seen, \
             detail = EXCLUDED.detail, updated_at = now() \
           WHERE alarms.last_seen IS NULL OR alarms.last_seen < EXCLUDED.last_seen \
         RETURNING (xmax = 0)",
    )
    .bind(meter)
    .bind(kind)
    .bind(at)
    .bind(detail)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("raising an alarm"))?;
    Ok(inserted == Some(true))
}

/// Commands the service has to publish (queued, never published, not expired), most urgent
/// first, at most `limit`.
///
/// # Errors
/// Database errors.
pub async fn outbox(pool: &PgPool, limit: i64) -> Result<Vec<CommandRow>, ControlError> {
    sqlx::query(&format!(
        "SELECT {ROW_COLUMNS} FROM commands \
         WHERE published_at IS NULL AND state = 'queued' AND expires_at > now() \
         ORDER BY priority DESC, issued_at LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(db("reading the outbox"))?
    .iter()
    .map(row_of)
    .collect()
}

/// Marks commands published (after the broker took them).
///
/// # Errors
/// Database errors.
pub async fn mark_published(
    pool: &PgPool,
    ids: &[String],
    at: OffsetDateTime,
) -> Result<(), ControlError> {
    sqlx::query(
        "UPDATE commands SET published_at = $2 WHERE command_id = ANY($1) AND published_at IS NULL",
    )
    .bind(ids)
    .bind(at)
    .execute(pool)
    .await
    .map_err(db("marking commands published"))?;
    Ok(())
}

/// The wire form of a stored command for its gateway.
///
/// # Errors
/// [`ControlError::Invalid`] when a stored id is not a valid gateway or meter id.
pub fn device_command(row: &CommandRow) -> Result<model::DeviceCommand, ControlError> {
    Ok(model::DeviceCommand {
        v: model::WIRE_VERSION,
        id: CommandId(row.id.clone()),
        gateway: model::GatewayId::new(row.gateway.clone())
            .map_err(|e| ControlError::Invalid(format!("gateway of `{}`: {e}", row.id)))?,
        device: MeterId::new(row.device.clone())
            .map_err(|e| ControlError::Invalid(format!("device of `{}`: {e}", row.id)))?,
        action: row.action.clone(),
        issued_by: row.issued_by.clone(),
        issued_at: row.issued_at,
        expires_at: row.expires_at,
    })
}

/// The topic a command for `device` at `gateway` is published on.
pub fn command_topic(root: &str, gateway: &str, device: &str) -> String {
    format!("{root}/{gateway}/cmd/{device}")
}
