//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::ApiError;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// The database and the broker are reachable.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = String), (status = 503, body = crate::error::Problem)))]
async fn readyz(State(s): State<AppState>) -> Result<&'static str, ApiError> {
    sqlx::query("SELECT 1")
        .execute(&s.pool)
        .await
        .map_err(|e| ApiError::Unavailable(format!("database unreachable: {e}")))?;
    if !s.publisher.connected() {
        return Err(ApiError::Unavailable("MQTT broker not connected".into()));
    }
    Ok("ready")
}

/// Prometheus metrics: requests, latency and errors per route, authentication failures.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, body = String)))]
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}
