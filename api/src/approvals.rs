//! The second approver (four-eyes) as the alternative to a second factor for high-risk
//! actions (seed §11).
//!
//! A caller without a second factor who sends `X-Second-Approver: request` on a high-risk
//! request gets `202 Accepted` and an approval id instead of `403 second_factor_required`: the
//! request (method, target, body, content type) is held in `api_approvals` with the caller's
//! identity and data scope. A *different* user holding an approver role for that action
//! ([`crate::rbac::approvers`]) and whose scope covers the requester's approves it
//! (`POST /api/v1/approvals/{id}/approve`); the held request is then executed once, as the
//! requester with the approval standing in for the second factor, through the same router (so
//! every check of the route — roles, scope, state — runs again at approval time), and its
//! answer is stored. Rejection and expiry (`API_APPROVAL_TTL`, default 24 h) end a request
//! without effect. Request, approval, rejection and execution are audited.
//!
//! Why a re-executed request rather than per-route "approved" variants: each high-risk route
//! already checks everything it needs, and replaying it keeps one code path per action.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::AppState;
use crate::auth::{Action, Principal, Role, Scope};
use crate::error::{ApiError, SecondFactorAction};

/// The request header asking for a second approver instead of a refusal.
pub const REQUEST_HEADER: &str = "x-second-approver";

/// Optional header: why the requester needs the action (shown to the approver, audited).
pub const REASON_HEADER: &str = "x-approval-reason";

fn held_reason(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| r.chars().take(1000).collect())
}

/// The router requests are dispatched to; the middleware hands it to the approve handler so
/// an approved request runs through exactly the routes and checks a direct call would.
#[derive(Clone)]
pub struct CoreRouter(pub Router);

impl std::fmt::Debug for CoreRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoreRouter")
    }
}

/// Set (only by this module, never from the wire) on a held request being executed after its
/// approval: the bearer extractor takes the requester's identity from it.
#[derive(Debug, Clone)]
pub struct ApprovedCall {
    /// The approval request.
    pub approval_id: i64,
    /// The requester, with the second factor satisfied by the approval.
    pub principal: Principal,
    /// Who approved (token subject).
    pub approver: String,
}

/// Adds the four-eyes middleware to `inner` (the routes); `core` is the complete application
/// without it, through which approved requests are executed.
pub fn layer(inner: Router<AppState>, state: AppState, core: Router) -> Router<AppState> {
    let held = Arc::new(Held {
        state,
        core: CoreRouter(core),
    });
    inner.layer(axum::middleware::from_fn_with_state(held, four_eyes))
}

/// The middleware's state.
pub struct Held {
    state: AppState,
    core: CoreRouter,
}

/// Hands the router to every request (the approve handler uses it) and turns a
/// `second_factor_required` refusal of a request that asked for a second approver into a held
/// request.
async fn four_eyes(State(held): State<Arc<Held>>, mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(held.core.clone());
    let asked = req
        .headers()
        .get(REQUEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("request"));
    if !asked {
        return next.run(req).await;
    }
    // The body is needed twice (the handler, then the held row): buffer it within the limit.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, held.state.config.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::TooLarge("request body is larger than the configured limit".into())
                .into_response();
        }
    };
    let method = parts.method.clone();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resp_reason = parts
        .headers
        .get(REASON_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned());
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes.clone())))
        .await;
    let Some(SecondFactorAction(action)) = resp.extensions().get::<SecondFactorAction>().cloned()
    else {
        return resp;
    };
    // The handler refused for want of a second factor, so the token was valid; verify it again
    // here for the identity to store (the handler's principal is not returned).
    let Some(token) = token else { return resp };
    let principal = match held.state.jwt.verify(&token).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let reason = held_reason(&resp_reason);
    match hold(
        &held.state,
        &principal,
        action,
        &HeldRequest {
            method: method.as_str().to_owned(),
            target,
            body: bytes.to_vec(),
            content_type,
        },
        reason,
    )
    .await
    {
        Ok(view) => {
            let mut r = (StatusCode::ACCEPTED, axum::Json(&view)).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/approvals/{}", view.id)) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(e) => e.into_response(),
    }
}

/// A request as held for approval.
#[derive(Debug, Clone)]
pub struct HeldRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Body bytes.
    pub body: Vec<u8>,
    /// `Content-Type`, when sent.
    pub content_type: Option<String>,
}

/// An approval request as the API shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ApprovalView {
    /// Id.
    pub id: i64,
    /// The high-risk action (`valve_close`, `meter_retire` …).
    pub action: String,
    /// Method and target of the held request (`POST /api/v1/commands`).
    pub request: String,
    /// Why the requester asked (`X-Approval-Reason`).
    pub reason: Option<String>,
    /// The held body when it is JSON.
    #[schema(value_type = Object)]
    pub body: Option<serde_json::Value>,
    /// Who asked (token subject).
    pub requested_by: String,
    /// `pending`, `approved` (executing), `executed`, `failed` (executed with an error answer),
    /// `rejected` or `expired`.
    pub state: String,
    /// When it was held (RFC 3339).
    pub created_at: String,
    /// When it expires unless decided (RFC 3339).
    pub expires_at: String,
    /// Who approved or rejected.
    pub decided_by: Option<String>,
    /// When (RFC 3339).
    pub decided_at: Option<String>,
    /// The decider's note.
    pub note: Option<String>,
    /// HTTP status of the executed request.
    pub result_status: Option<i64>,
    /// Its answer (JSON, or `{"text": …}`).
    #[schema(value_type = Object)]
    pub result: Option<serde_json::Value>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// The columns of [`ApprovalRow`], in order.
pub(crate) const COLUMNS: &str = "approval_id, action, method, target, body, content_type, requested_by, \
     requester_roles, requester_org, requester_areas, reason, \
     CASE WHEN state = 'pending' AND expires_at <= now() THEN 'expired' ELSE state END AS state, \
     created_at, expires_at, decided_by, decided_at, decision_note, result_status::bigint AS result_status, result_body";

/// One `api_approvals` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ApprovalRow {
    pub(crate) approval_id: i64,
    pub(crate) action: String,
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) body: Vec<u8>,
    pub(crate) content_type: Option<String>,
    pub(crate) requested_by: String,
    pub(crate) requester_roles: Vec<String>,
    pub(crate) requester_org: Option<String>,
    pub(crate) requester_areas: Vec<String>,
    pub(crate) reason: Option<String>,
    pub(crate) state: String,
    pub(crate) created_at: OffsetDateTime,
    pub(crate) expires_at: OffsetDateTime,
    pub(crate) decided_by: Option<String>,
    pub(crate) decided_at: Option<OffsetDateTime>,
    pub(crate) decision_note: Option<String>,
    pub(crate) result_status: Option<i64>,
    pub(crate) result_body: Option<serde_json::Value>,
}

impl ApprovalRow {
    pub(crate) fn view(self) -> ApprovalView {
        ApprovalView {
            id: self.approval_id,
            action: self.action,
            request: format!("{} {}", self.method, self.target),
            body: serde_json::from_slice(&self.body).ok(),
            reason: self.reason,
            requested_by: self.requested_by,
            state: self.state,
            created_at: rfc3339(self.created_at),
            expires_at: rfc3339(self.expires_at),
            decided_by: self.decided_by,
            decided_at: self.decided_at.map(rfc3339),
            note: self.decision_note,
            result_status: self.result_status,
            result: self.result_body,
        }
    }

    /// The requester as they were when they asked, with the approval as second factor.
    pub(crate) fn requester(&self) -> Principal {
        Principal {
            subject: self.requested_by.clone(),
            roles: self
                .requester_roles
                .iter()
                .filter_map(|r| Role::parse(r))
                .collect(),
            scope: Scope {
                org: self.requester_org.clone(),
                areas: self.requester_areas.clone(),
            },
            second_factor: true,
        }
    }
}

/// Whether `outer` sees every meter `inner` sees (an approver must see what they approve).
pub fn scope_covers(outer: &Scope, inner: &Scope) -> bool {
    match (&outer.org, &inner.org) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) if a != b => false,
        _ => {
            outer.areas.is_empty()
                || (!inner.areas.is_empty() && inner.areas.iter().all(|a| outer.areas.contains(a)))
        }
    }
}

async fn audit(
    pool: &PgPool,
    actor: &str,
    what: &str,
    id: i64,
    detail: serde_json::Value,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail) VALUES ($1, $2, 'api_approval', $3, $4)",
    )
    .bind(actor)
    .bind(what)
    .bind(id.to_string())
    .bind(detail)
    .execute(pool)
    .await
    .map_err(ApiError::db("auditing an approval"))?;
    Ok(())
}

/// Holds a refused high-risk request for a second approver and audits it.
///
/// # Errors
/// Database errors (500).
pub async fn hold(
    s: &AppState,
    p: &Principal,
    action: Action,
    req: &HeldRequest,
    reason: Option<String>,
) -> Result<ApprovalView, ApiError> {
    let ttl = s.config.approval_ttl;
    let expires = OffsetDateTime::now_utc() + ttl;
    let roles: Vec<String> = p.roles.iter().map(|r| r.as_str().to_owned()).collect();
    let row: ApprovalRow = sqlx::query_as(&format!(
        "INSERT INTO api_approvals (action, method, target, body, content_type, requested_by,
             requester_roles, requester_org, requester_areas, reason, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {COLUMNS}"
    ))
    .bind(action.as_str())
    .bind(&req.method)
    .bind(&req.target)
    .bind(&req.body)
    .bind(&req.content_type)
    .bind(&p.subject)
    .bind(&roles)
    .bind(&p.scope.org)
    .bind(&p.scope.areas)
    .bind(reason)
    .bind(expires)
    .fetch_one(&s.pool)
    .await
    .map_err(ApiError::db("holding a request for approval"))?;
    audit(
        &s.pool,
        &p.actor(),
        "approval.request",
        row.approval_id,
        serde_json::json!({
            "action": action.as_str(), "request": format!("{} {}", req.method, req.target),
            "body_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&req.body)),
            "expires_at": rfc3339(expires),
        }),
    )
    .await?;
    s.metrics.approval(action.as_str(), "requested");
    Ok(row.view())
}

/// Loads one approval row (pending past its deadline reads as `expired`).
pub(crate) async fn load(pool: &PgPool, id: i64) -> Result<Option<ApprovalRow>, ApiError> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_approvals WHERE approval_id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(ApiError::db("reading an approval"))
}

/// Why a decision is refused, checked in this order.
fn refuse_decision(row: &ApprovalRow, decider: &Principal) -> Result<(), ApiError> {
    if row.requested_by == decider.subject {
        return Err(ApiError::Forbidden(
            "four eyes: the requester cannot decide their own request; another user with an approver role must"
                .into(),
        ));
    }
    let action = Action::parse(&row.action).ok_or_else(|| {
        ApiError::Internal(format!("approval with unknown action {:?}", row.action))
    })?;
    decider.require(crate::rbac::approvers(action))?;
    if !scope_covers(&decider.scope, &row.requester().scope) {
        return Err(ApiError::Forbidden(
            "your data scope does not cover the requester's: you cannot decide this request".into(),
        ));
    }
    match row.state.as_str() {
        "pending" => Ok(()),
        "expired" => Err(ApiError::Conflict(format!(
            "approval {} expired at {} undecided",
            row.approval_id,
            rfc3339(row.expires_at)
        ))),
        other => Err(ApiError::Conflict(format!(
            "approval {} is already {other}{}",
            row.approval_id,
            row.decided_by
                .as_deref()
                .map(|d| format!(" (by {d})"))
                .unwrap_or_default()
        ))),
    }
}

/// Marks a pending request decided by `decider`; exactly one decision wins a race.
async fn decide(
    pool: &PgPool,
    row: &ApprovalRow,
    decider: &Principal,
    state: &str,
    note: Option<&str>,
) -> Result<(), ApiError> {
    let done = sqlx::query(
        "UPDATE api_approvals SET state = $2, decided_by = $3, decided_at = now(), decision_note = $4
         WHERE approval_id = $1 AND state = 'pending' AND expires_at > now()",
    )
    .bind(row.approval_id)
    .bind(state)
    .bind(&decider.subject)
    .bind(note)
    .execute(pool)
    .await
    .map_err(ApiError::db("deciding an approval"))?
    .rows_affected();
    if done == 0 {
        return Err(ApiError::Conflict(format!(
            "approval {} was decided or expired meanwhile",
            row.approval_id
        )));
    }
    Ok(())
}

/// Rejects a pending request.
///
/// # Errors
/// 404 unknown or out of scope, 403 the requester or a role without approval rights, 409 not
/// pending.
pub async fn reject(
    s: &AppState,
    decider: &Principal,
    id: i64,
    note: Option<&str>,
) -> Result<ApprovalView, ApiError> {
    let row = visible(s, decider, id).await?;
    refuse_decision(&row, decider)?;
    decide(&s.pool, &row, decider, "rejected", note).await?;
    audit(
        &s.pool,
        &decider.actor(),
        "approval.reject",
        id,
        serde_json::json!({"action": row.action, "requested_by": row.requested_by, "note": note}),
    )
    .await?;
    s.metrics.approval(&row.action, "rejected");
    load(&s.pool, id)
        .await?
        .map(ApprovalRow::view)
        .ok_or_else(|| ApiError::NotFound(format!("no approval {id}")))
}

/// Approves a pending request and executes it once through `core` as the requester.
///
/// # Errors
/// As [`reject`]; the executed request's own refusal is not an error here but the stored
/// result (state `failed`).
pub async fn approve(
    s: &AppState,
    core: &CoreRouter,
    decider: &Principal,
    id: i64,
    note: Option<&str>,
) -> Result<ApprovalView, ApiError> {
    let row = visible(s, decider, id).await?;
    refuse_decision(&row, decider)?;
    decide(&s.pool, &row, decider, "approved", note).await?;
    audit(
        &s.pool,
        &decider.actor(),
        "approval.approve",
        id,
        serde_json::json!({"action": row.action, "requested_by": row.requested_by, "note": note}),
    )
    .await?;
    s.metrics.approval(&row.action, "approved");
    let mut req = axum::http::Request::builder()
        .method(row.method.as_str())
        .uri(row.target.as_str());
    if let Some(ct) = &row.content_type {
        req = req.header(header::CONTENT_TYPE, ct.as_str());
    }
    let mut req = req
        .body(Body::from(row.body.clone()))
        .map_err(|e| ApiError::Internal(format!("rebuilding held request {id}: {e}")))?;
    req.extensions_mut().insert(ApprovedCall {
        approval_id: id,
        principal: row.requester(),
        approver: decider.subject.clone(),
    });
    let mut router = core.0.clone();
    let resp = match tower_service::Service::call(&mut router, req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let result: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(
        |_| serde_json::json!({"text": String::from_utf8_lossy(&bytes).chars().take(4000).collect::<String>()}),
    );
    let state = if status.is_success() {
        "executed"
    } else {
        "failed"
    };
    sqlx::query(
        "UPDATE api_approvals SET state = $2, result_status = $3, result_body = $4 WHERE approval_id = $1",
    )
    .bind(id)
    .bind(state)
    .bind(i16::try_from(status.as_u16()).unwrap_or(i16::MAX))
    .bind(&result)
    .execute(&s.pool)
    .await
    .map_err(ApiError::db("recording an approval's result"))?;
    audit(
        &s.pool,
        &decider.actor(),
        "approval.execute",
        id,
        serde_json::json!({"action": row.action, "requested_by": row.requested_by,
            "status": status.as_u16()}),
    )
    .await?;
    s.metrics.approval(&row.action, state);
    load(&s.pool, id)
        .await?
        .map(ApprovalRow::view)
        .ok_or_else(|| ApiError::NotFound(format!("no approval {id}")))
}

/// An approval the caller's scope covers (another org's requests answer 404).
pub(crate) async fn visible(s: &AppState, p: &Principal, id: i64) -> Result<ApprovalRow, ApiError> {
    match load(&s.pool, id).await? {
        Some(r) if scope_covers(&p.scope, &r.requester().scope) || r.requested_by == p.subject => {
            Ok(r)
        }
        _ => Err(ApiError::NotFound(format!(
            "no approval {id} in your scope"
        ))),
    }
}

/// Lists approvals visible to `p`, newest first, optionally of one state.
///
/// # Errors
/// Database errors (500).
pub async fn list(
    s: &AppState,
    p: &Principal,
    state: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<Vec<ApprovalView>, ApiError> {
    // Scope filter in SQL on the requester's org; the area check is done in Rust (rare).
    let rows: Vec<ApprovalRow> = sqlx::query_as(&format!(
        "SELECT * FROM (SELECT {COLUMNS} FROM api_approvals
           WHERE ($1::text IS NULL OR requester_org = $1 OR requested_by = $4)) a
         WHERE ($2::text IS NULL OR a.state = $2)
         ORDER BY approval_id DESC LIMIT $3 OFFSET $5"
    ))
    .bind(&p.scope.org)
    .bind(state)
    .bind(limit)
    .bind(&p.subject)
    .bind(offset)
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("listing approvals"))?;
    Ok(rows
        .into_iter()
        .filter(|r| scope_covers(&p.scope, &r.requester().scope) || r.requested_by == p.subject)
        .map(ApprovalRow::view)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(org: Option<&str>, areas: &[&str]) -> Scope {
        Scope {
            org: org.map(str::to_owned),
            areas: areas.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    #[test]
    fn an_approver_must_see_everything_the_requester_sees() {
        assert!(scope_covers(&scope(None, &[]), &scope(Some("a"), &["x"])));
        assert!(scope_covers(
            &scope(Some("a"), &[]),
            &scope(Some("a"), &["x"])
        ));
        assert!(scope_covers(
            &scope(Some("a"), &["x", "y"]),
            &scope(Some("a"), &["x"])
        ));
        assert!(!scope_covers(
            &scope(Some("a"), &["x"]),
            &scope(Some("a"), &["x", "y"])
        ));
        assert!(!scope_covers(
            &scope(Some("a"), &["x"]),
            &scope(Some("a"), &[])
        ));
        assert!(!scope_covers(
            &scope(Some("a"), &[]),
            &scope(Some("b"), &[])
        ));
        assert!(!scope_covers(&scope(Some("a"), &[]), &scope(None, &[])));
    }
}
