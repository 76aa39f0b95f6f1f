//! Alarms: list and filter, acknowledge, close (on `pipeline::detect::store`), audited.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ApiError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Auth};
use crate::rbac;
use crate::routes::{Page, Paged, scope_sql};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_alarms))
        .routes(routes!(acknowledge))
        .routes(routes!(close))
}

/// An alarm.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct AlarmView {
    /// Id.
    pub alarm_id: i64,
    /// Meter id.
    pub meter_id: String,
    /// Kind (`leak`, `burst`, `tamper`, `communication_loss`, ...).
    pub kind: String,
    /// Severity.
    pub severity: String,
    /// `open`, `acknowledged` or `closed`.
    pub state: String,
    /// Start of the condition (event time).
    #[serde(with = "time::serde::rfc3339")]
    pub raised_at: OffsetDateTime,
    /// Last occurrence.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    /// Occurrences counted.
    pub occurrences: i32,
    /// Who acknowledged it.
    pub acknowledged_by: Option<String>,
    /// When it closed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub cleared_at: Option<OffsetDateTime>,
    /// Who closed it (`auto` when the condition ended).
    pub closed_by: Option<String>,
    /// Detector detail.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// Alarm filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlarmQuery {
    /// Meter id.
    pub meter: Option<String>,
    /// Kind.
    pub kind: Option<String>,
    /// `open`, `acknowledged` or `closed`.
    pub state: Option<String>,
    /// Severity.
    pub severity: Option<String>,
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip.
    pub offset: Option<i64>,
}

/// Alarms of meters in the caller's scope, newest first.
#[utoipa::path(get, path = "/api/v1/alarms", tag = "ALARM", params(AlarmQuery),
    security(("bearer" = [])),
    responses((status = 200, body = Paged<AlarmView>), (status = 422, body = Problem)))]
async fn list_alarms(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(q): ApiQuery<AlarmQuery>,
) -> Result<axum::Json<Paged<AlarmView>>, ApiError> {
    p.require(rbac::ALARMS_READ)?;
    let (limit, offset) = Page {
        limit: q.limit,
        offset: q.offset,
    }
    .resolve(s.config.max_page)?;
    if let Some(st) = &q.state
        && !matches!(st.as_str(), "open" | "acknowledged" | "closed")
    {
        return Err(ApiError::field("state", "open, acknowledged or closed"));
    }
    // Alarms of meters the registry does not know are visible only to unscoped callers.
    let sql = format!(
        "SELECT a.alarm_id, a.meter_id, a.kind, a.severity, a.state, a.raised_at, a.last_seen,
                a.occurrences, a.acknowledged_by, a.cleared_at, a.closed_by, a.detail
         FROM alarms a LEFT JOIN meters m ON m.meter_id = a.meter_id
         WHERE (($1::text IS NULL AND $2::text[] IS NULL) OR (m.meter_id IS NOT NULL AND {}))
           AND ($3::text IS NULL OR a.meter_id = $3) AND ($4::text IS NULL OR a.kind = $4)
           AND ($5::text IS NULL OR a.state = $5) AND ($6::text IS NULL OR a.severity = $6)
         ORDER BY a.raised_at DESC, a.alarm_id DESC LIMIT $7 OFFSET $8",
        scope_sql(1, 2)
    );
    let items: Vec<AlarmView> = sqlx::query_as(&sql)
        .bind(&p.scope.org)
        .bind(p.scope.areas_param())
        .bind(&q.meter)
        .bind(&q.kind)
        .bind(&q.state)
        .bind(&q.severity)
        .bind(limit)
        .bind(offset)
        .fetch_all(&s.pool)
        .await
        .map_err(ApiError::db("listing alarms"))?;
    Ok(axum::Json(Paged::new(items, limit, offset)))
}

/// A note on an alarm action.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlarmNote {
    /// Free text, audited.
    #[serde(default)]
    pub note: Option<String>,
}

/// The alarm after the action.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AlarmChanged {
    /// Id.
    pub alarm_id: i64,
    /// State now.
    pub state: String,
}

async fn alarm_action(
    s: &AppState,
    p: &crate::auth::Principal,
    id: i64,
    note: Option<String>,
    close: bool,
) -> Result<axum::Json<AlarmChanged>, ApiError> {
    p.require(rbac::ALARMS_WRITE)?;
    if note.as_ref().is_some_and(|n| n.len() > 1000) {
        return Err(ApiError::field("note", "at most 1000 characters"));
    }
    let mut tx = s.pool.begin().await.map_err(ApiError::db("beginning"))?;
    let row: Option<(String, String)> = sqlx::query_as(&format!(
        "SELECT a.meter_id, a.state FROM alarms a LEFT JOIN meters m ON m.meter_id = a.meter_id
         WHERE a.alarm_id = $3
           AND (($1::text IS NULL AND $2::text[] IS NULL) OR (m.meter_id IS NOT NULL AND {}))
         FOR UPDATE OF a",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(ApiError::db("finding the alarm"))?;
    let Some((meter, state)) = row else {
        return Err(ApiError::NotFound(format!("no alarm {id} in your scope")));
    };
    let actor = p.actor();
    let done = if close {
        pipeline::detect::store::close(&mut tx, id, &actor).await
    } else {
        pipeline::detect::store::acknowledge(&mut tx, id, &actor).await
    }
    .map_err(|e| ApiError::Internal(format!("alarm action: {e:?}")))?;
    if !done {
        return Err(ApiError::Conflict(format!(
            "alarm {id} is {state}; it cannot be {}",
            if close { "closed" } else { "acknowledged" }
        )));
    }
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail) VALUES ($1, $2, 'alarm', $3, $4)",
    )
    .bind(&actor)
    .bind(if close { "alarm.close" } else { "alarm.acknowledge" })
    .bind(id.to_string())
    .bind(serde_json::json!({"meter_id": meter, "note": note}))
    .execute(&mut *tx)
    .await
    .map_err(ApiError::db("auditing the alarm action"))?;
    tx.commit().await.map_err(ApiError::db("committing"))?;
    Ok(axum::Json(AlarmChanged {
        alarm_id: id,
        state: if close { "closed" } else { "acknowledged" }.into(),
    }))
}

/// Acknowledge an open alarm.
#[utoipa::path(post, path = "/api/v1/alarms/{id}/ack", tag = "ALARM",
    params(("id" = i64, Path)), request_body = AlarmNote, security(("bearer" = [])),
    responses((status = 200, body = AlarmChanged), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
async fn acknowledge(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<i64>,
    ApiJson(n): ApiJson<AlarmNote>,
) -> Result<axum::Json<AlarmChanged>, ApiError> {
    alarm_action(&s, &p, id, n.note, false).await
}

/// Close an alarm by hand (the only way a tamper alarm closes).
#[utoipa::path(post, path = "/api/v1/alarms/{id}/close", tag = "ALARM",
    params(("id" = i64, Path)), request_body = AlarmNote, security(("bearer" = [])),
    responses((status = 200, body = AlarmChanged), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
async fn close(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(id): ApiPath<i64>,
    ApiJson(n): ApiJson<AlarmNote>,
) -> Result<axum::Json<AlarmChanged>, ApiError> {
    alarm_action(&s, &p, id, n.note, true).await
}
