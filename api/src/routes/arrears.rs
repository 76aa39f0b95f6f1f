//! The arrears rule's human steps on `pipeline::control::rules` (DOMAIN.md §3): recording the
//! payment demand and the advance notice, reading the rule's decisions, and the bulk approval
//! of arrears closures held above the bulk threshold. The rule itself (safeguards, calendar,
//! the closes) runs in the control service or the scheduler; an approval here only lets its
//! next run close the approved meters, after checking every safeguard again.

use axum::extract::State;
use axum::http::StatusCode;
use pipeline::control::rules::{self, NoticeKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Action;
use crate::error::{ApiError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Auth};
use crate::rbac;
use crate::routes::{Page, meter_in_scope, scope_sql};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(record_notice))
        .routes(routes!(list_notices))
        .routes(routes!(meter_decisions))
        .routes(routes!(held_closures))
        .routes(routes!(approve_closures))
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// A notice given to the customer of a meter in arrears.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNotice {
    /// `payment_demand` (催缴) or `advance_notice` (停水预告).
    pub kind: String,
    /// When it was sent (RFC 3339).
    pub sent_at: String,
}

/// A recorded notice.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NoticeView {
    /// Id.
    pub id: i64,
    /// Meter id.
    pub meter: String,
    /// `payment_demand` or `advance_notice`.
    pub kind: String,
    /// When it was sent.
    pub sent_at: String,
    /// Who recorded it.
    pub recorded_by: String,
    /// When it was recorded.
    pub recorded_at: String,
}

fn parse_kind(k: &str) -> Result<NoticeKind, ApiError> {
    match k {
        "payment_demand" => Ok(NoticeKind::PaymentDemand),
        "advance_notice" => Ok(NoticeKind::AdvanceNotice),
        _ => Err(ApiError::field(
            "kind",
            "must be payment_demand or advance_notice",
        )),
    }
}

/// Record a payment demand or advance notice sent to the customer of a meter (the arrears
/// rule closes a valve only after both and the notice period). Audited (`arrears.notice`).
#[utoipa::path(post, path = "/api/v1/meters/{meter}/arrears-notices", tag = "EXT-1001",
    params(("meter" = String, Path)), request_body = NewNotice, security(("bearer" = [])),
    responses((status = 201, body = NoticeView), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn record_notice(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiJson(n): ApiJson<NewNotice>,
) -> Result<(StatusCode, axum::Json<NoticeView>), ApiError> {
    p.require(rbac::ARREARS_NOTICES_WRITE)?;
    let kind = parse_kind(&n.kind)?;
    let sent_at = OffsetDateTime::parse(&n.sent_at, &time::format_description::well_known::Rfc3339)
        .map_err(|e| ApiError::field("sent_at", format!("not RFC 3339: {e}")))?;
    // A notice "sent" in the future would let the rule count a period that has not run.
    if sent_at > OffsetDateTime::now_utc() + time::Duration::minutes(5) {
        return Err(ApiError::field("sent_at", "is in the future"));
    }
    let m = meter_in_scope(&s.pool, &p.scope, &meter).await?;
    rules::record_notice(&s.pool, &m.meter_id, kind, sent_at, &p.actor())
        .await
        .map_err(|e| ApiError::Internal(format!("recording a notice: {e:?}")))?;
    let row: (i64, String, String, OffsetDateTime, String, OffsetDateTime) = sqlx::query_as(
        "SELECT notice_id, meter_id, kind, sent_at, recorded_by, recorded_at FROM arrears_notices
         WHERE meter_id = $1 ORDER BY notice_id DESC LIMIT 1",
    )
    .bind(&m.meter_id)
    .fetch_one(&s.pool)
    .await
    .map_err(ApiError::db("reading the notice back"))?;
    Ok((StatusCode::CREATED, axum::Json(notice_view(row))))
}

fn notice_view(r: (i64, String, String, OffsetDateTime, String, OffsetDateTime)) -> NoticeView {
    NoticeView {
        id: r.0,
        meter: r.1,
        kind: r.2,
        sent_at: rfc3339(r.3),
        recorded_by: r.4,
        recorded_at: rfc3339(r.5),
    }
}

/// Notice list filter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NoticeQuery {
    /// Only this meter (number or id).
    pub meter: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip.
    pub offset: Option<i64>,
}

/// A page of notices.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NoticeList {
    /// Newest first.
    pub items: Vec<NoticeView>,
    /// Offset of the next page, absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<i64>,
}

/// Arrears notices of meters in the caller's scope, newest first.
#[utoipa::path(get, path = "/api/v1/arrears-notices", tag = "EXT-1001", params(NoticeQuery),
    security(("bearer" = [])),
    responses((status = 200, body = NoticeList), (status = 403, body = Problem),
        (status = 404, body = Problem)))]
async fn list_notices(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(q): ApiQuery<NoticeQuery>,
) -> Result<axum::Json<NoticeList>, ApiError> {
    p.require(rbac::ARREARS_RULE_READ)?;
    let kind = q.kind.as_deref().map(parse_kind).transpose()?;
    let meter = match q.meter.as_deref() {
        Some(m) => Some(meter_in_scope(&s.pool, &p.scope, m).await?.meter_id),
        None => None,
    };
    let (limit, offset) = Page {
        limit: q.limit,
        offset: q.offset,
    }
    .resolve(s.config.max_page)?;
    let rows: Vec<(i64, String, String, OffsetDateTime, String, OffsetDateTime)> =
        sqlx::query_as(&format!(
            "SELECT n.notice_id, n.meter_id, n.kind, n.sent_at, n.recorded_by, n.recorded_at
             FROM arrears_notices n JOIN meters m USING (meter_id)
             WHERE ($1::text IS NULL OR n.meter_id = $1) AND ($2::text IS NULL OR n.kind = $2)
               AND {}
             ORDER BY n.notice_id DESC LIMIT $5 OFFSET $6",
            scope_sql(3, 4)
        ))
        .bind(&meter)
        .bind(kind.map(NoticeKind::as_str))
        .bind(&p.scope.org)
        .bind(p.scope.areas_param())
        .bind(limit)
        .bind(offset)
        .fetch_all(&s.pool)
        .await
        .map_err(ApiError::db("listing notices"))?;
    let items: Vec<NoticeView> = rows.into_iter().map(notice_view).collect();
    let full = i64::try_from(items.len()).unwrap_or(i64::MAX) >= limit;
    Ok(axum::Json(NoticeList {
        items,
        next_offset: full.then_some(offset + limit),
    }))
}

/// One decision of a control rule.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DecisionView {
    /// Rule (`arrears_close`, `arrears_reopen`, `burst_auto_close` …).
    pub rule: String,
    /// Meter id.
    pub meter: String,
    /// `issued`, `deferred`, `refused`, `awaiting_approval` or `approved`.
    pub outcome: String,
    /// Why, in words.
    pub reason: String,
    /// What it was decided on.
    #[schema(value_type = Object)]
    pub inputs: Value,
    /// The command issued, if any.
    pub command: Option<String>,
}

/// The control rules' decisions about a meter (arrears, burst), oldest first, with inputs.
#[utoipa::path(get, path = "/api/v1/meters/{meter}/control-decisions", tag = "EXT-1001",
    params(("meter" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = [DecisionView]), (status = 404, body = Problem)))]
async fn meter_decisions(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
) -> Result<axum::Json<Vec<DecisionView>>, ApiError> {
    p.require(rbac::ARREARS_RULE_READ)?;
    let m = meter_in_scope(&s.pool, &p.scope, &meter).await?;
    let list = rules::decisions(&s.pool, &m.meter_id)
        .await
        .map_err(|e| ApiError::Internal(format!("reading decisions: {e:?}")))?;
    Ok(axum::Json(
        list.into_iter()
            .map(|d| DecisionView {
                rule: d.rule,
                meter: d.meter,
                outcome: d.outcome,
                reason: d.reason,
                inputs: d.inputs,
                command: d.command,
            })
            .collect(),
    ))
}

/// An arrears closure held for bulk approval.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeldClosure {
    /// Meter id.
    pub meter: String,
    /// Meter number.
    pub meter_no: String,
    /// The hold's reason (how many closes, the threshold).
    pub reason: String,
    /// When the rule held it.
    pub held_at: String,
    /// The rule's inputs (account, amount, notices, period …).
    #[schema(value_type = Object)]
    pub inputs: Value,
}

/// The meters in scope whose latest arrears decision is `awaiting_approval`.
async fn held_in_scope(
    s: &AppState,
    p: &crate::auth::Principal,
) -> Result<Vec<HeldClosure>, ApiError> {
    let rows: Vec<(String, String, String, OffsetDateTime, Value)> = sqlx::query_as(&format!(
        "SELECT d.meter_id, m.meter_no, d.reason, d.at, d.inputs
         FROM (SELECT DISTINCT ON (meter_id) meter_id, outcome, reason, at, inputs
               FROM control_decisions WHERE rule = $1
               ORDER BY meter_id, at DESC, decision_id DESC) d
         JOIN meters m USING (meter_id)
         WHERE d.outcome = 'awaiting_approval' AND {}
         ORDER BY d.meter_id",
        scope_sql(2, 3)
    ))
    .bind(rules::ARREARS_CLOSE)
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("reading held closures"))?;
    Ok(rows
        .into_iter()
        .map(|(meter, meter_no, reason, at, inputs)| HeldClosure {
            meter,
            meter_no,
            reason,
            held_at: rfc3339(at),
            inputs,
        })
        .collect())
}

/// Arrears closures held because one run would close more meters than the bulk threshold
/// (a person must approve them), within the caller's scope.
#[utoipa::path(get, path = "/api/v1/arrears-closures/held", tag = "EXT-1001",
    security(("bearer" = [])),
    responses((status = 200, body = [HeldClosure]), (status = 403, body = Problem)))]
async fn held_closures(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> Result<axum::Json<Vec<HeldClosure>>, ApiError> {
    p.require(rbac::ARREARS_RULE_READ)?;
    Ok(axum::Json(held_in_scope(&s, &p).await?))
}

/// Which held closures to approve.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClosureApproval {
    /// Meter numbers or ids; absent: every held closure in the caller's scope.
    pub meters: Option<Vec<String>>,
}

/// The outcome of a bulk approval.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClosureApproved {
    /// Meter ids approved: the rule's next run closes them if every safeguard still holds
    /// (working hours, notices, not paid meanwhile).
    pub approved: Vec<String>,
    /// Requested meters that had no held closure (already decided, paid, or never held).
    pub not_held: Vec<String>,
}

/// Approve held arrears closures (bulk; closes valves, so high-risk as `valve_close`: a
/// second factor, or `X-Second-Approver: request` for a second person). Audited as an
/// `approved` decision per meter naming the approver.
#[utoipa::path(post, path = "/api/v1/arrears-closures/approve", tag = "EXT-1001",
    request_body = ClosureApproval, security(("bearer" = [])),
    responses((status = 200, body = ClosureApproved), (status = 202, body = crate::approvals::ApprovalView),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 422, body = Problem)))]
async fn approve_closures(
    State(s): State<AppState>,
    approved: Option<axum::Extension<crate::approvals::ApprovedCall>>,
    Auth(p): Auth,
    ApiJson(a): ApiJson<ClosureApproval>,
) -> Result<axum::Json<ClosureApproved>, ApiError> {
    p.require(rbac::ARREARS_CLOSURES_APPROVE)?;
    if a.meters
        .as_ref()
        .is_some_and(|m| m.is_empty() || m.len() > 5000)
    {
        return Err(ApiError::field(
            "meters",
            "1..=5000 meters, or absent for all held",
        ));
    }
    p.require_second_factor(Action::ValveClose, &s.config.second_factor_actions)?;
    let held: Vec<String> = held_in_scope(&s, &p)
        .await?
        .into_iter()
        .map(|h| h.meter)
        .collect();
    let mut wanted = Vec::new();
    let mut not_held = Vec::new();
    match &a.meters {
        None => wanted.clone_from(&held),
        Some(list) => {
            for key in list {
                let m = meter_in_scope(&s.pool, &p.scope, key).await?;
                if held.contains(&m.meter_id) {
                    if !wanted.contains(&m.meter_id) {
                        wanted.push(m.meter_id);
                    }
                } else {
                    not_held.push(m.meter_id);
                }
            }
        }
    }
    let approved = if wanted.is_empty() {
        Vec::new()
    } else {
        // With a second approver, the decision names both people.
        let approver = match approved {
            Some(axum::Extension(call)) => format!(
                "{} with api:{} (approval {})",
                p.actor(),
                call.approver,
                call.approval_id
            ),
            None => p.actor(),
        };
        rules::approve_arrears(&s.pool, &approver, Some(wanted.as_slice()))
            .await
            .map_err(|e| ApiError::Internal(format!("approving closures: {e:?}")))?
    };
    Ok(axum::Json(ClosureApproved { approved, not_held }))
}
