//! The HTTP API (axum): push (IF-METER-004), manual reads (IF-REV-004), the meter registry
//! (IF-METER-001/002), readings (EXT-601), alarms, commands and hydrant permits (EXT-1001),
//! billing (IF-REV-005) and the audit log.
//!
//! `api` owns HTTP: routing, authentication (bearer JWTs, signed external clients), RBAC and
//! data scope, request validation and error mapping (problem+json). It reads and writes through
//! `pipeline`'s library functions and hands readings to the workers over the same partition
//! topics as the gateways ([`publish`]); it never speaks a device protocol beyond decoding
//! pushed frames with `decoders`. Stateless: every shared fact (nonces, idempotency keys, jobs,
//! call log) is in PostgreSQL, so several nodes can run behind a load balancer.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod approvals;
pub mod audit;
pub mod auth;
pub mod calllog;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod publish;
pub mod rbac;
pub mod routes;
pub mod signing;
pub mod tls;
pub mod ui;
pub mod users;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use billing_core::TariffBook;
use sqlx::PgPool;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::{Action, JwtVerifier};
use crate::calllog::{CallCtx, CallLog};
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::publish::Publisher;

/// Limits and policies of the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Most reads or frames per push or manual-read request.
    pub max_batch: usize,
    /// Accepted clock skew of signed requests, seconds (the nonce window is twice it).
    pub max_skew_s: u64,
    /// High-risk actions that need a second factor.
    pub second_factor_actions: Vec<Action>,
    /// Most rows per page of list endpoints.
    pub max_page: i64,
    /// How long a request held for a second approver stays pending.
    pub approval_ttl: time::Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            max_batch: 5000,
            max_skew_s: 300,
            second_factor_actions: Action::ALL.to_vec(),
            max_page: 1000,
            approval_ttl: time::Duration::hours(24),
        }
    }
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The database.
    pub pool: PgPool,
    /// Bearer-token verification.
    pub jwt: Arc<JwtVerifier>,
    /// Hand-off of readings to the workers.
    pub publisher: Arc<Publisher>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Limits and policies.
    pub config: Arc<ApiConfig>,
    /// Tariffs for quotes and bill runs (`None`: not configured, those endpoints answer 503).
    pub tariffs: Option<Arc<TariffBook>>,
    /// The six-field call log.
    pub calls: CallLog,
}

/// The OpenAPI document's frame; operations are added by the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Water-meter platform API",
        version = "1",
        description = "Operations are tagged with their seed interface number. Bearer JWT (HS256 or RS256) \
            on every /api/v1 route except IF-METER-004 push, which is signed by the client \
            (X-Client-Id, X-Timestamp, X-Nonce, X-Signature = hex HMAC-SHA256 over \
            WM-HMAC-SHA256-V1\\nMETHOD\\npath\\ntimestamp\\nnonce\\nhex(sha256(body)))."
    ),
    modifiers(&SecurityAddon),
    components(schemas(error::Problem))
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "signed",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Signature"))),
        );
    }
}

/// The application: every route, the OpenAPI document at `/api/v1/openapi.json` and its UI at
/// `/api/v1/docs`.
pub fn app(state: AppState) -> Router {
    let (router, openapi) = api_router().split_for_parts();
    let max_body = state.config.max_body_bytes;
    let inner = router
        .merge(SwaggerUi::new("/api/v1/docs").url("/api/v1/openapi.json", openapi))
        .merge(ui::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body));
    // An approved request runs through `core`: tracked like any call, never held again.
    let core = tracked(inner.clone(), &state);
    tracked(approvals::layer(inner, state.clone(), core), &state)
}

/// Adds the per-request bookkeeping (metrics, call log) and the state.
fn tracked(r: Router<AppState>, state: &AppState) -> Router {
    r.layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state.clone())
}

/// The documented routes (also used to print the OpenAPI document without a server).
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes::health::router())
        .merge(routes::push::router())
        .merge(routes::meters::router())
        .merge(routes::readings::router())
        .merge(routes::alarms::router())
        .merge(routes::billing::router())
        .merge(routes::commands::router())
        .merge(routes::approvals::router())
        .merge(routes::arrears::router())
        .merge(routes::audit::router())
        .merge(routes::dashboard_routers())
}

/// The OpenAPI document as JSON.
pub fn openapi_json() -> String {
    api_router()
        .split_for_parts()
        .1
        .to_pretty_json()
        .unwrap_or_default()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> Response {
    let mut r = ApiError::bad_request("method not allowed on this route").into_response();
    *r.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    r
}

/// Per-request bookkeeping: metrics per route and the six-field call log of `/api/v1` calls.
async fn track(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let ctx = CallCtx::new(req.method(), req.uri());
    req.extensions_mut().insert(ctx.clone());
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let logged = route.starts_with("/api/v1/") && !route.starts_with("/api/v1/docs");
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let code = resp.extensions().get::<ErrorCode>().map(|c| c.0);
    state
        .metrics
        .request(&route, method, status, code, start.elapsed());
    if logged {
        state.calls.record(&ctx, status, code, &route, peer);
    }
    resp
}

fn method_label(m: &axum::http::Method) -> &'static str {
    match *m {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// Background upkeep of one node: purges expired nonces every minute.
pub fn spawn_upkeep(pool: PgPool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = signing::purge_nonces(&pool).await {
                tracing::warn!(error = %e, "purging expired nonces failed");
            }
        }
    });
}
