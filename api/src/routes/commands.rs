//! Commands (valve control) and EXT-1001 消火栓控制 (hydrant permits and unlocks), on
//! `pipeline::control`. Issuing writes a `commands` row (the outbox); the control service
//! publishes it, so the API needs no MQTT here. The library audits every change itself.

use axum::extract::State;
use axum::http::StatusCode;
use model::{CommandAction, MeterId};
use pipeline::control::{self, ControlError, hydrant};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Auth};
use crate::rbac;
use crate::routes::meter_in_scope;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(issue_command))
        .routes(routes!(get_command))
        .routes(routes!(list_commands))
        .routes(routes!(cancel_command))
        .routes(routes!(retry_command))
        .routes(routes!(create_permit))
        .routes(routes!(revoke_permit))
        .routes(routes!(unlock_hydrant))
}

/// Maps a control error to problem+json; `field` names the request field an `Invalid` error
/// is about (the library's message says which rule it broke).
fn control_error(e: ControlError, field: &str) -> ApiError {
    use ControlError as C;
    match e {
        C::UnknownDevice(d) => ApiError::NotFound(format!("no meter {d:?} in the registry")),
        C::NotFound(id) => ApiError::NotFound(format!("no command {id:?}")),
        e @ C::NoGateway(_) => ApiError::field("device", e.to_string()),
        e @ C::Unsupported { .. } => ApiError::field("action", e.to_string()),
        e @ (C::TooManyPending { .. }
        | C::IdConflict { .. }
        | C::BadState { .. }
        | C::RetryLimit { .. }
        | C::Permit { .. }) => ApiError::Conflict(e.to_string()),
        C::Invalid(m) => ApiError::field(field, m),
        e @ (C::Db { .. } | C::Store(_) | C::Calendar { .. } | C::Mqtt(_)) => {
            ApiError::Internal(format!("control: {e:?}"))
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// One entry of a command's history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandEventView {
    /// When (RFC 3339, UTC).
    pub at: String,
    /// State name, or `superseded` / `retried`.
    pub state: String,
    /// Who reported it and why.
    #[schema(value_type = Object)]
    pub detail: Option<Value>,
}

/// A command as the control service holds it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandView {
    /// Id (the idempotency key).
    pub id: String,
    /// Target device (meter id).
    pub device: String,
    /// Serving gateway at issue time.
    pub gateway: String,
    /// Wire name of the action (`valve_close`, `hydrant_unlock`, …).
    pub action_type: String,
    /// The action as sent to the gateway.
    #[schema(value_type = Object)]
    pub action: Value,
    /// `queued`, `sent`, `delivered`, `acknowledged`, `confirmed_by_telemetry`, `failed`,
    /// `expired` or `cancelled`.
    pub state: String,
    /// Detail of the state (failure reason, canceller).
    #[schema(value_type = Object)]
    pub state_detail: Option<Value>,
    /// Issuer.
    pub issued_by: String,
    /// Reason given.
    pub reason: String,
    /// The alarm, bill, permit or rule behind it.
    #[schema(value_type = Object)]
    pub cause: Value,
    /// Priority 0..=9, 9 most urgent.
    pub priority: i16,
    /// Approver, where one was required.
    pub approver: Option<String>,
    /// The command this one retries or cancels.
    pub parent: Option<String>,
    /// Retry number (0 for an original).
    pub attempt: i16,
    /// The newer command that superseded this one.
    pub superseded_by: Option<String>,
    /// Issue time (RFC 3339, UTC).
    pub issued_at: String,
    /// Expiry (RFC 3339, UTC).
    pub expires_at: String,
    /// When the control service published it.
    pub published_at: Option<String>,
    /// History, oldest first (only on `GET /api/v1/commands/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<CommandEventView>>,
}

impl CommandView {
    fn of(r: control::CommandRow) -> Self {
        Self {
            action_type: control::action_name(&r.action),
            action: serde_json::to_value(&r.action).unwrap_or(Value::Null),
            state: r.state.as_str().to_owned(),
            issued_at: rfc3339(r.issued_at),
            expires_at: rfc3339(r.expires_at),
            published_at: r.published_at.map(rfc3339),
            id: r.id,
            device: r.device,
            gateway: r.gateway,
            state_detail: r.state_detail,
            issued_by: r.issued_by,
            reason: r.reason,
            cause: r.cause,
            priority: r.priority,
            approver: r.approver,
            parent: r.parent,
            attempt: r.attempt,
            superseded_by: r.superseded_by,
            events: None,
        }
    }
}

/// What an issue (or retry, or unlock) did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuedView {
    /// The command (new, or the existing one with this id).
    pub command: CommandView,
    /// False when the id existed already: nothing new happened.
    pub created: bool,
    /// Older queued valve commands this one superseded.
    pub superseded: Vec<String>,
}

fn issued(i: control::Issued) -> (StatusCode, axum::Json<IssuedView>) {
    let status = if i.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (
        status,
        axum::Json(IssuedView {
            command: CommandView::of(i.command),
            created: i.created,
            superseded: i.superseded,
        }),
    )
}

/// A command to issue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    /// Idempotency key (1..=200 characters): the same id again returns the first command.
    pub id: String,
    /// Target: meter number or meter id.
    pub device: String,
    /// `valve_open`, `valve_close`, `hydrant_lock`, `set_time`, `mbus_application_reset`,
    /// `read_now` (Modbus and wired M-Bus devices: one poll now), or
    /// an object such as `{"type": "modbus_write", "register": 3, "value": 1}`. Hydrant
    /// unlocks go through `POST /api/v1/hydrants/{hydrant}/unlock`, cancels through
    /// `POST /api/v1/commands/{id}/cancel`.
    #[schema(value_type = Object)]
    pub action: Value,
    /// Why (audited), 1..=1000 characters.
    pub reason: String,
    /// 0..=9, 9 most urgent (default 5).
    pub priority: Option<i64>,
}

fn parse_action(v: Value) -> Result<CommandAction, ApiError> {
    let v = match v {
        Value::String(s) => serde_json::json!({ "type": s }),
        other => other,
    };
    let action: CommandAction = serde_json::from_value(v)
        .map_err(|e| ApiError::field("action", format!("not a supported action: {e}")))?;
    match action {
        CommandAction::HydrantUnlock { .. } => Err(ApiError::field(
            "action",
            "hydrant_unlock is issued only inside a permit: POST /api/v1/hydrants/{hydrant}/unlock",
        )),
        CommandAction::Cancel { .. } => Err(ApiError::field(
            "action",
            "cancel a command with POST /api/v1/commands/{id}/cancel",
        )),
        a => Ok(a),
    }
}

/// Valve open/close are high-risk (seed §11): a second factor when configured.
fn require_action_factor(
    s: &AppState,
    p: &Principal,
    action: &CommandAction,
) -> Result<(), ApiError> {
    let policy = &s.config.second_factor_actions;
    match action {
        CommandAction::ValveClose => p.require_second_factor(Action::ValveClose, policy),
        CommandAction::ValveOpen => p.require_second_factor(Action::ValveOpen, policy),
        CommandAction::HydrantUnlock { .. } => {
            p.require_second_factor(Action::HydrantUnlock, policy)
        }
        _ => Ok(()),
    }
}

/// Issue a command to a device (valve open/close and the other device actions), idempotent
/// by id. 201 when new, 200 when the id existed with the same device and action.
#[utoipa::path(post, path = "/api/v1/commands", tag = "EXT-1001", request_body = NewCommand,
    security(("bearer" = [])),
    responses((status = 201, body = IssuedView), (status = 200, body = IssuedView),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn issue_command(
    State(s): State<AppState>,
    approved: Option<axum::Extension<crate::approvals::ApprovedCall>>,
    Auth(p): Auth,
    ApiJson(n): ApiJson<NewCommand>,
) -> Result<(StatusCode, axum::Json<IssuedView>), ApiError> {
    p.require(rbac::COMMANDS_WRITE)?;
    if n.id.is_empty() || n.id.len() > 200 {
        return Err(ApiError::field("id", "must be 1..=200 characters"));
    }
    if n.reason.trim().is_empty() || n.reason.len() > 1000 {
        return Err(ApiError::field("reason", "must be 1..=1000 characters"));
    }
    let priority = match n.priority {
        None => control::PRIORITY_DEFAULT,
        Some(v) => u8::try_from(v)
            .ok()
            .filter(|v| *v <= control::PRIORITY_HIGHEST)
            .ok_or_else(|| ApiError::field("priority", "must be 0..=9"))?,
    };
    let action = parse_action(n.action)?;
    require_action_factor(&s, &p, &action)?;
    let m = meter_in_scope(&s.pool, &p.scope, &n.device).await?;
    let device = MeterId::new(m.meter_id).map_err(|e| ApiError::field("device", e.to_string()))?;
    let read_now = action == CommandAction::ReadNow;
    let mut req = control::IssueRequest::new(n.id, device, action, p.actor(), n.reason);
    req.priority = priority;
    // A reading asked for now is worthless tomorrow: no 48 h TTL for it.
    if read_now {
        req.ttl = time::Duration::minutes(15);
    }
    req.cause = serde_json::json!({"source": "api", "caller": p.subject});
    // Issued after a second person's approval (four-eyes): the command names them.
    if let Some(axum::Extension(call)) = approved {
        req.approver = Some(format!("api:{}", call.approver));
        req.cause["approval"] = serde_json::json!(call.approval_id);
    }
    let out = control::issue(&s.pool, &req)
        .await
        .map_err(|e| control_error(e, "id"))?;
    Ok(issued(out))
}

/// A command of a device in the caller's scope (unknown and out-of-scope both answer 404).
async fn command_in_scope(
    s: &AppState,
    p: &Principal,
    id: &str,
) -> Result<control::CommandRow, ApiError> {
    let not_found = || ApiError::NotFound(format!("no command {id:?} in your scope"));
    let row = match control::get(&s.pool, id).await {
        Ok(r) => r,
        Err(ControlError::NotFound(_)) => return Err(not_found()),
        Err(e) => return Err(control_error(e, "id")),
    };
    match meter_in_scope(&s.pool, &p.scope, &row.device).await {
        Ok(_) => Ok(row),
        Err(ApiError::NotFound(_)) => Err(not_found()),
        Err(e) => Err(e),
    }
}

/// A command's state and its history of events.
#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "EXT-1001",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = CommandView), (status = 404, body = Problem)))]
async fn get_command(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<CommandView>, ApiError> {
    p.require(rbac::COMMANDS_READ)?;
    let row = command_in_scope(&s, &p, &id).await?;
    let events = control::events(&s.pool, &id)
        .await
        .map_err(|e| control_error(e, "id"))?;
    let mut view = CommandView::of(row);
    view.events = Some(
        events
            .into_iter()
            .map(|e| CommandEventView {
                at: rfc3339(e.at),
                state: e.state,
                detail: e.detail,
            })
            .collect(),
    );
    Ok(axum::Json(view))
}

/// Command list filter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CommandQuery {
    /// Most commands, newest first (1..1000, default 100).
    pub limit: Option<i64>,
}

/// The commands of a device.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandList {
    /// Newest first.
    pub items: Vec<CommandView>,
}

/// The commands of a meter (or hydrant), newest first.
#[utoipa::path(get, path = "/api/v1/meters/{meter}/commands", tag = "EXT-1001",
    params(("meter" = String, Path, description = "meter number or meter id"), CommandQuery),
    security(("bearer" = [])),
    responses((status = 200, body = CommandList), (status = 404, body = Problem),
        (status = 422, body = Problem)))]
async fn list_commands(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiQuery(q): ApiQuery<CommandQuery>,
) -> Result<axum::Json<CommandList>, ApiError> {
    p.require(rbac::COMMANDS_READ)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=s.config.max_page).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be 1..{}", s.config.max_page),
        ));
    }
    let m = meter_in_scope(&s.pool, &p.scope, &meter).await?;
    let rows = control::list(&s.pool, &m.meter_id, limit)
        .await
        .map_err(|e| control_error(e, "meter"))?;
    Ok(axum::Json(CommandList {
        items: rows.into_iter().map(CommandView::of).collect(),
    }))
}

/// What a cancel did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CancelView {
    /// The cancelled command.
    pub id: String,
    /// `withdrawn` (never published: cancelled at the centre) or `requested` (published: a
    /// cancel command asks the gateway to drop it; it becomes `cancelled` when the gateway
    /// reports so).
    pub outcome: String,
    /// The cancel command's id, when one was issued.
    pub cancel_command: Option<String>,
    /// The command's state now.
    pub state: String,
}

/// Cancel a pending command (idempotent).
#[utoipa::path(post, path = "/api/v1/commands/{id}/cancel", tag = "EXT-1001",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = CancelView), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
async fn cancel_command(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<CancelView>, ApiError> {
    p.require(rbac::COMMANDS_WRITE)?;
    command_in_scope(&s, &p, &id).await?;
    let out = control::cancel(&s.pool, &id, &p.actor())
        .await
        .map_err(|e| control_error(e, "id"))?;
    let state = control::get(&s.pool, &id)
        .await
        .map_err(|e| control_error(e, "id"))?
        .state
        .as_str()
        .to_owned();
    let (outcome, cancel_command) = match out {
        control::Cancelled::Withdrawn => ("withdrawn", None),
        control::Cancelled::Requested(c) => ("requested", Some(c)),
    };
    Ok(axum::Json(CancelView {
        id,
        outcome: outcome.into(),
        cancel_command,
        state,
    }))
}

/// Retry a failed or expired command as a new id (`{id}-r`) linked to it (idempotent,
/// bounded). A valve retry is high-risk like the valve command itself.
#[utoipa::path(post, path = "/api/v1/commands/{id}/retry", tag = "EXT-1001",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 201, body = IssuedView), (status = 200, body = IssuedView),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn retry_command(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, axum::Json<IssuedView>), ApiError> {
    p.require(rbac::COMMANDS_WRITE)?;
    let row = command_in_scope(&s, &p, &id).await?;
    require_action_factor(&s, &p, &row.action)?;
    let out = control::retry(&s.pool, &id, &p.actor())
        .await
        .map_err(|e| control_error(e, "id"))?;
    Ok(issued(out))
}

/// A hydrant permit (EXT-1001 取水权限).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPermit {
    /// Permit number (idempotency key).
    pub id: String,
    /// Hydrant: meter number or meter id (`hydrant:<id>`).
    pub hydrant: String,
    /// Who may draw water.
    pub holder: String,
    /// Window start (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub valid_from: OffsetDateTime,
    /// Window end, exclusive (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub valid_to: OffsetDateTime,
    /// Volume limit, m³ (recorded; not enforced yet, see docs/control.md).
    #[schema(value_type = Option<String>)]
    pub volume_limit_m3: Option<Decimal>,
}

/// A permit after a change.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PermitView {
    /// Permit number.
    pub id: String,
    /// Hydrant meter id.
    pub hydrant: String,
    /// Holder.
    pub holder: String,
    /// Window start.
    pub valid_from: String,
    /// Window end, exclusive.
    pub valid_to: String,
    /// Revocation time.
    pub revoked_at: Option<String>,
}

async fn permit_view(s: &AppState, id: &str) -> Result<Option<PermitView>, ApiError> {
    type Row = (
        String,
        String,
        OffsetDateTime,
        OffsetDateTime,
        Option<OffsetDateTime>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT hydrant_id, holder, valid_from, valid_to, revoked_at FROM hydrant_permits \
         WHERE permit_id = $1",
    )
    .bind(id)
    .fetch_optional(&s.pool)
    .await
    .map_err(ApiError::db("reading a permit"))?;
    Ok(row.map(|(hydrant, holder, from, to, revoked)| PermitView {
        id: id.to_owned(),
        hydrant,
        holder,
        valid_from: rfc3339(from),
        valid_to: rfc3339(to),
        revoked_at: revoked.map(rfc3339),
    }))
}

/// EXT-1001 消火栓控制: grant a hydrant permit. 201 when new, 200 for the same permit again.
#[utoipa::path(post, path = "/api/v1/hydrant-permits", tag = "EXT-1001", request_body = NewPermit,
    security(("bearer" = [])),
    responses((status = 201, body = PermitView), (status = 200, body = PermitView),
        (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem)))]
async fn create_permit(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiJson(n): ApiJson<NewPermit>,
) -> Result<(StatusCode, axum::Json<PermitView>), ApiError> {
    p.require(rbac::COMMANDS_WRITE)?;
    if n.id.is_empty() || n.id.len() > 200 {
        return Err(ApiError::field("id", "must be 1..=200 characters"));
    }
    if n.holder.trim().is_empty() || n.holder.len() > 200 {
        return Err(ApiError::field("holder", "must be 1..=200 characters"));
    }
    if n.valid_to <= n.valid_from {
        return Err(ApiError::field("valid_to", "must be after valid_from"));
    }
    if n.volume_limit_m3.is_some_and(|v| v <= Decimal::ZERO) {
        return Err(ApiError::field("volume_limit_m3", "must be positive"));
    }
    let m = meter_in_scope(&s.pool, &p.scope, &n.hydrant).await?;
    if !m.meter_id.starts_with("hydrant:") {
        return Err(ApiError::field(
            "hydrant",
            format!("{:?} is not a hydrant (expected hydrant:<id>)", m.meter_id),
        ));
    }
    let permit = hydrant::Permit {
        id: n.id.clone(),
        hydrant: m.meter_id,
        holder: n.holder,
        valid_from: n.valid_from,
        valid_to: n.valid_to,
        volume_limit_m3: n.volume_limit_m3,
        issued_by: p.actor(),
    };
    let created = hydrant::create_permit(&s.pool, &permit)
        .await
        .map_err(|e| control_error(e, "id"))?;
    let view = permit_view(&s, &n.id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("permit {} vanished", n.id)))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(view)))
}

/// A permit of a hydrant in the caller's scope.
async fn permit_in_scope(s: &AppState, p: &Principal, id: &str) -> Result<PermitView, ApiError> {
    let not_found = || ApiError::NotFound(format!("no hydrant permit {id:?} in your scope"));
    let view = permit_view(s, id).await?.ok_or_else(not_found)?;
    match meter_in_scope(&s.pool, &p.scope, &view.hydrant).await {
        Ok(_) => Ok(view),
        Err(ApiError::NotFound(_)) => Err(not_found()),
        Err(e) => Err(e),
    }
}

/// Revoke a permit; the control service then locks its hydrant.
#[utoipa::path(post, path = "/api/v1/hydrant-permits/{id}/revoke", tag = "EXT-1001",
    params(("id" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = PermitView), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
async fn revoke_permit(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<PermitView>, ApiError> {
    p.require(rbac::COMMANDS_WRITE)?;
    let view = permit_in_scope(&s, &p, &id).await?;
    if let Some(at) = &view.revoked_at {
        return Err(ApiError::Conflict(format!(
            "hydrant permit {id:?} was already revoked at {at}"
        )));
    }
    hydrant::revoke(&s.pool, &id, &p.actor(), OffsetDateTime::now_utc())
        .await
        .map_err(|e| control_error(e, "id"))?;
    let view = permit_view(&s, &id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("permit {id} vanished")))?;
    Ok(axum::Json(view))
}

/// Which permit an unlock uses.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnlockRequest {
    /// The permit (default: the hydrant's permit active now).
    #[serde(default)]
    pub permit: Option<String>,
}

/// EXT-1001 消火栓控制: unlock a hydrant for the rest of an active permit's window (high-risk).
/// Refused (409) outside the window, with the window in the detail.
#[utoipa::path(post, path = "/api/v1/hydrants/{hydrant}/unlock", tag = "EXT-1001",
    params(("hydrant" = String, Path, description = "meter number or meter id")),
    request_body = UnlockRequest, security(("bearer" = [])),
    responses((status = 201, body = IssuedView), (status = 200, body = IssuedView),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
async fn unlock_hydrant(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(hydrant_key): ApiPath<String>,
    ApiJson(u): ApiJson<UnlockRequest>,
) -> Result<(StatusCode, axum::Json<IssuedView>), ApiError> {
    p.require(rbac::COMMANDS_WRITE)?;
    p.require_second_factor(Action::HydrantUnlock, &s.config.second_factor_actions)?;
    let m = meter_in_scope(&s.pool, &p.scope, &hydrant_key).await?;
    if !m.meter_id.starts_with("hydrant:") {
        return Err(ApiError::field(
            "hydrant",
            format!("{:?} is not a hydrant (expected hydrant:<id>)", m.meter_id),
        ));
    }
    let now = OffsetDateTime::now_utc();
    let permit = match u.permit {
        Some(id) => {
            let view = permit_view(&s, &id).await?;
            if view.as_ref().is_none_or(|v| v.hydrant != m.meter_id) {
                return Err(ApiError::NotFound(format!(
                    "no permit {id:?} for hydrant {:?}",
                    m.meter_id
                )));
            }
            id
        }
        None => {
            // The permit active now; else the next one to start, else the last one to end,
            // so that the refusal names the window that does not cover now.
            let id: Option<String> = sqlx::query_scalar(
                "SELECT permit_id FROM hydrant_permits WHERE hydrant_id = $1 \
                 ORDER BY (revoked_at IS NULL AND valid_from <= $2 AND valid_to > $2) DESC, \
                          (valid_to > $2) DESC, \
                          CASE WHEN valid_to > $2 THEN valid_from END ASC, valid_to DESC \
                 LIMIT 1",
            )
            .bind(&m.meter_id)
            .bind(now)
            .fetch_optional(&s.pool)
            .await
            .map_err(ApiError::db("finding the hydrant's permit"))?;
            id.ok_or_else(|| {
                ApiError::Conflict(format!(
                    "hydrant {:?} has no permit: an unlock needs an active permit",
                    m.meter_id
                ))
            })?
        }
    };
    let out = hydrant::unlock(&s.pool, &permit, &p.actor(), now)
        .await
        .map_err(|e| control_error(e, "permit"))?;
    Ok(issued(out))
}
