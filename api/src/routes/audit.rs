//! The audit log (read) and its verification.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ApiError, Problem};
use crate::extract::{ApiQuery, Auth};
use crate::rbac;
use crate::routes::{Page, Paged};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(verify))
}

/// An audit row.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct AuditRow {
    /// Id.
    pub audit_id: i64,
    /// Chain position.
    pub chain_seq: Option<i64>,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// Entity kind.
    pub entity: String,
    /// Entity id.
    pub entity_id: String,
    /// Detail.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// Audit filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Entity kind (`meter`, `alarm`, `bill`...).
    pub entity: Option<String>,
    /// Entity id.
    pub entity_id: Option<String>,
    /// Actor.
    pub actor: Option<String>,
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip.
    pub offset: Option<i64>,
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "AUDIT", params(AuditQuery),
    security(("bearer" = [])), responses((status = 200, body = Paged<AuditRow>),
        (status = 403, body = Problem)))]
async fn list(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<axum::Json<Paged<AuditRow>>, ApiError> {
    p.require(rbac::AUDIT_READ)?;
    let (limit, offset) = Page {
        limit: q.limit,
        offset: q.offset,
    }
    .resolve(s.config.max_page)?;
    let items: Vec<AuditRow> = sqlx::query_as(
        "SELECT audit_id, chain_seq, at, actor, action, entity, entity_id, detail FROM audit_log
         WHERE ($1::text IS NULL OR entity = $1) AND ($2::text IS NULL OR entity_id = $2)
           AND ($3::text IS NULL OR actor = $3)
         ORDER BY audit_id DESC LIMIT $4 OFFSET $5",
    )
    .bind(&q.entity)
    .bind(&q.entity_id)
    .bind(&q.actor)
    .bind(limit)
    .bind(offset)
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("listing the audit log"))?;
    Ok(axum::Json(Paged::new(items, limit, offset)))
}

/// Verify the hash chain of the audit log: finds changed, deleted and inserted rows.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "AUDIT", security(("bearer" = [])),
    responses((status = 200, body = crate::audit::Report), (status = 403, body = Problem)))]
async fn verify(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> Result<axum::Json<crate::audit::Report>, ApiError> {
    p.require(rbac::AUDIT_READ)?;
    let report = crate::audit::verify(&s.pool)
        .await
        .map_err(ApiError::db("verifying the audit chain"))?;
    Ok(axum::Json(report))
}
