//! The second approver (four-eyes) for high-risk actions: list, read, approve, reject held
//! requests. The holding and the execution are in [`crate::approvals`].

use axum::Extension;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::approvals::{self, ApprovalView, CoreRouter};
use crate::error::{ApiError, Problem};
use crate::extract::{ApiPath, ApiQuery, Auth};
use crate::rbac;
use crate::routes::Page;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_approvals))
        .routes(routes!(get_approval))
        .routes(routes!(approve))
        .routes(routes!(reject))
}

/// Approval list filter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ApprovalQuery {
    /// `pending`, `approved`, `executed`, `failed`, `rejected` or `expired`.
    pub state: Option<String>,
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip.
    pub offset: Option<i64>,
}

/// A page of approval requests.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApprovalList {
    /// Newest first.
    pub items: Vec<ApprovalView>,
    /// Offset of the next page, absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<i64>,
}

/// A decision's optional note.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionNote {
    /// Why (audited), at most 1000 characters.
    pub note: Option<String>,
}

const STATES: [&str; 6] = [
    "pending", "approved", "executed", "failed", "rejected", "expired",
];

/// Requests held for a second approver (a high-risk call sent with
/// `X-Second-Approver: request` by a caller without a second factor), newest first, within the
/// caller's data scope.
#[utoipa::path(get, path = "/api/v1/approvals", tag = "SECURITY", params(ApprovalQuery),
    security(("bearer" = [])),
    responses((status = 200, body = ApprovalList), (status = 403, body = Problem)))]
async fn list_approvals(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(q): ApiQuery<ApprovalQuery>,
) -> Result<axum::Json<ApprovalList>, ApiError> {
    p.require(rbac::APPROVALS_READ)?;
    if let Some(st) = q.state.as_deref()
        && !STATES.contains(&st)
    {
        return Err(ApiError::field(
            "state",
            format!("must be one of {}", STATES.join(", ")),
        ));
    }
    let (limit, offset) = Page {
        limit: q.limit,
        offset: q.offset,
    }
    .resolve(s.config.max_page)?;
    let items = approvals::list(&s, &p, q.state.as_deref(), limit, offset).await?;
    let full = i64::try_from(items.len()).unwrap_or(i64::MAX) >= limit;
    Ok(axum::Json(ApprovalList {
        items,
        next_offset: full.then_some(offset + limit),
    }))
}

/// One held request, its decision and the executed request's answer.
#[utoipa::path(get, path = "/api/v1/approvals/{id}", tag = "SECURITY",
    params(("id" = i64, Path)), security(("bearer" = [])),
    responses((status = 200, body = ApprovalView), (status = 404, body = Problem)))]
async fn get_approval(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<ApprovalView>, ApiError> {
    p.require(rbac::APPROVALS_READ)?;
    Ok(axum::Json(approvals::visible(&s, &p, id).await?.view()))
}

/// The optional `{"note": …}` body (an empty body is no note).
fn note(body: &[u8]) -> Result<Option<String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let n: DecisionNote = serde_json::from_slice(body).map_err(|e| ApiError::Invalid {
        field: None,
        detail: format!("body: {e}"),
        status: axum::http::StatusCode::UNPROCESSABLE_ENTITY,
    })?;
    let note = n.note;
    if note.as_deref().is_some_and(|n| n.len() > 1000) {
        return Err(ApiError::field("note", "at most 1000 characters"));
    }
    Ok(note)
}

/// Approve a held request as the second person: a different user holding the action's
/// approver role (meter actions: meter_admin; bill rerun and bulk arrears clearing: billing)
/// whose scope covers the requester's. The request is then executed once as the requester;
/// the answer is in `result_status`/`result` (state `executed`, or `failed` when the route
/// refused it at execution time, e.g. the meter changed meanwhile).
#[utoipa::path(post, path = "/api/v1/approvals/{id}/approve", tag = "SECURITY",
    params(("id" = i64, Path)), request_body(content = DecisionNote, description = "optional"),
    security(("bearer" = [])),
    responses((status = 200, body = ApprovalView), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn approve(
    State(s): State<AppState>,
    Extension(core): Extension<CoreRouter>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<i64>,
    body: axum::body::Bytes,
) -> Result<axum::Json<ApprovalView>, ApiError> {
    p.require(rbac::APPROVALS_READ)?;
    let note = note(&body)?;
    Ok(axum::Json(
        approvals::approve(&s, &core, &p, id, note.as_deref()).await?,
    ))
}

/// Reject a held request (same rights as approving); nothing is executed.
#[utoipa::path(post, path = "/api/v1/approvals/{id}/reject", tag = "SECURITY",
    params(("id" = i64, Path)), request_body(content = DecisionNote, description = "optional"),
    security(("bearer" = [])),
    responses((status = 200, body = ApprovalView), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
async fn reject(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<i64>,
    body: axum::body::Bytes,
) -> Result<axum::Json<ApprovalView>, ApiError> {
    p.require(rbac::APPROVALS_READ)?;
    let note = note(&body)?;
    Ok(axum::Json(
        approvals::reject(&s, &p, id, note.as_deref()).await?,
    ))
}
