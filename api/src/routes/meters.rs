//! IF-METER-001 (registry query) and IF-METER-002 (registry lifecycle), on
//! `pipeline::registry`.

use axum::extract::State;
use axum::http::StatusCode;
use pipeline::registry::{self, MeterInput, Replacement, Status};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::{Action, Principal};
use crate::error::{ApiError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Auth};
use crate::rbac;
use crate::routes::{Page, Paged, meter_in_scope, scope_sql};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_meters, register_meter))
        .routes(routes!(get_meter))
        .routes(routes!(install))
        .routes(routes!(activate))
        .routes(routes!(mark_faulty))
        .routes(routes!(retire))
        .routes(routes!(replace))
        .routes(routes!(bind_customer, unbind_customer))
        .routes(routes!(move_book))
}

/// A meter as the registry holds it.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct MeterView {
    /// Protocol address, the key of readings.
    pub meter_id: String,
    /// The utility's meter number.
    pub meter_no: Option<String>,
    /// Protocol.
    pub protocol: String,
    /// Lifecycle status.
    pub status: String,
    /// Meter model.
    pub model_code: Option<String>,
    /// Caliber DN.
    pub caliber_dn: Option<i16>,
    /// Meter class.
    pub meter_class: String,
    /// Customer (tariff) class.
    pub customer_class: String,
    /// Persons in the household.
    pub persons: i32,
    /// Organisation.
    pub org: Option<String>,
    /// Area.
    pub area: Option<String>,
    /// Address.
    pub address: Option<String>,
    /// District metered area.
    pub dma: Option<String>,
    /// Meter book.
    pub meter_book: Option<String>,
    /// Bound customer account.
    pub customer_account: Option<String>,
    /// Network role.
    pub role: String,
    /// Has a valve.
    pub has_valve: bool,
    /// Serving gateway.
    pub gateway_id: Option<String>,
    /// Installation time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub installed_at: Option<OffsetDateTime>,
    /// Retirement time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub retired_at: Option<OffsetDateTime>,
}

const METER_COLUMNS: &str = "m.meter_id, m.meter_no, m.protocol, m.status, m.model_code, \
    m.caliber_dn, m.meter_class, m.customer_class, m.persons, m.org, m.area, m.address, m.dma, \
    m.meter_book, b.account_id AS customer_account, m.role, m.has_valve, m.gateway_id, \
    m.installed_at, m.retired_at";
const METER_FROM: &str = "meters m LEFT JOIN meter_customer_bindings b \
    ON b.meter_id = m.meter_id AND b.unbound_at IS NULL";

/// Registry query filters (all optional, combined with AND).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MeterQuery {
    /// Exact meter number.
    pub meter_no: Option<String>,
    /// Exact meter id (address).
    pub meter_id: Option<String>,
    /// Part of the address text.
    pub address: Option<String>,
    /// Bound customer account.
    pub customer: Option<String>,
    /// District metered area.
    pub dma: Option<String>,
    /// Meter book.
    pub book: Option<String>,
    /// Lifecycle status.
    pub status: Option<String>,
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip.
    pub offset: Option<i64>,
}

/// IF-METER-001 水表档案查询: meters by number, address, customer, DMA, book or status,
/// within the caller's organisation and areas.
#[utoipa::path(get, path = "/api/v1/meters", tag = "IF-METER-001", params(MeterQuery),
    security(("bearer" = [])),
    responses((status = 200, body = Paged<MeterView>), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem)))]
async fn list_meters(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(q): ApiQuery<MeterQuery>,
) -> Result<axum::Json<Paged<MeterView>>, ApiError> {
    p.require(rbac::METERS_READ)?;
    let (limit, offset) = Page {
        limit: q.limit,
        offset: q.offset,
    }
    .resolve(s.config.max_page)?;
    if let Some(st) = &q.status
        && Status::parse(st).is_none()
    {
        return Err(ApiError::field(
            "status",
            format!("{st:?} is not a lifecycle status"),
        ));
    }
    let address = q.address.as_ref().map(|a| {
        format!(
            "%{}%",
            a.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });
    let sql = format!(
        "SELECT {METER_COLUMNS} FROM {METER_FROM} WHERE {}
           AND ($3::text IS NULL OR m.meter_no = $3) AND ($4::text IS NULL OR m.meter_id = $4)
           AND ($5::text IS NULL OR m.address ILIKE $5) AND ($6::text IS NULL OR b.account_id = $6)
           AND ($7::text IS NULL OR m.dma = $7) AND ($8::text IS NULL OR m.meter_book = $8)
           AND ($9::text IS NULL OR m.status = $9)
         ORDER BY m.meter_no NULLS LAST, m.meter_id LIMIT $10 OFFSET $11",
        scope_sql(1, 2)
    );
    let items: Vec<MeterView> = sqlx::query_as(&sql)
        .bind(&p.scope.org)
        .bind(p.scope.areas_param())
        .bind(&q.meter_no)
        .bind(&q.meter_id)
        .bind(&address)
        .bind(&q.customer)
        .bind(&q.dma)
        .bind(&q.book)
        .bind(&q.status)
        .bind(limit)
        .bind(offset)
        .fetch_all(&s.pool)
        .await
        .map_err(ApiError::db("querying meters"))?;
    Ok(axum::Json(Paged::new(items, limit, offset)))
}

/// IF-METER-001: one meter by number or id.
#[utoipa::path(get, path = "/api/v1/meters/{meter}", tag = "IF-METER-001",
    params(("meter" = String, Path, description = "meter number or meter id")),
    security(("bearer" = [])),
    responses((status = 200, body = MeterView), (status = 404, body = Problem)))]
async fn get_meter(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
) -> Result<axum::Json<MeterView>, ApiError> {
    p.require(rbac::METERS_READ)?;
    let m = meter_in_scope(&s.pool, &p.scope, &meter).await?;
    let view: MeterView = sqlx::query_as(&format!(
        "SELECT {METER_COLUMNS} FROM {METER_FROM} WHERE m.meter_id = $1"
    ))
    .bind(&m.meter_id)
    .fetch_one(&s.pool)
    .await
    .map_err(ApiError::db("reading a meter"))?;
    Ok(axum::Json(view))
}

/// A meter to register (status `in_stock`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMeter {
    /// Meter number (unique).
    pub meter_no: String,
    /// Protocol address.
    pub meter_id: String,
    /// Protocol (default: the id's prefix).
    pub protocol: Option<String>,
    /// Model code.
    pub model_code: Option<String>,
    /// Caliber DN.
    pub caliber_dn: Option<i16>,
    /// Meter class.
    pub meter_class: Option<String>,
    /// Organisation (required for a caller scoped to one).
    pub org: Option<String>,
    /// Area.
    pub area: Option<String>,
    /// Address text.
    pub address: Option<String>,
    /// District metered area.
    pub dma: Option<String>,
    /// Meter book.
    pub meter_book: Option<String>,
    /// Customer account to bind.
    pub customer_account: Option<String>,
    /// Customer class.
    pub customer_class: Option<String>,
    /// Persons in the household.
    pub persons: Option<i32>,
    /// Has a valve.
    #[serde(default)]
    pub has_valve: bool,
    /// Serving gateway.
    pub gateway_id: Option<String>,
}

/// The state of a meter after a change.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MeterChanged {
    /// Meter id.
    pub meter_id: String,
    /// Lifecycle status now.
    pub status: String,
}

/// IF-METER-002 水表档案维护: register a meter (in stock).
#[utoipa::path(post, path = "/api/v1/meters", tag = "IF-METER-002", request_body = NewMeter,
    security(("bearer" = [])),
    responses((status = 201, body = MeterChanged), (status = 403, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
async fn register_meter(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiJson(n): ApiJson<NewMeter>,
) -> Result<(StatusCode, axum::Json<MeterChanged>), ApiError> {
    p.require(rbac::METERS_WRITE)?;
    if let Some(org) = &p.scope.org {
        if n.org.as_ref() != Some(org) {
            return Err(ApiError::Forbidden(format!(
                "org must be {org:?}, your organisation"
            )));
        }
        if !p.scope.areas.is_empty() && !n.area.as_ref().is_some_and(|a| p.scope.areas.contains(a))
        {
            return Err(ApiError::Forbidden("area must be one of your areas".into()));
        }
    }
    let protocol = n
        .protocol
        .clone()
        .unwrap_or_else(|| registry::protocol_of(&n.meter_id).to_owned());
    let input = MeterInput {
        meter_no: n.meter_no,
        meter_id: n.meter_id.clone(),
        protocol,
        model_code: n.model_code,
        caliber_dn: n.caliber_dn,
        meter_class: n.meter_class,
        org: n.org,
        area: n.area,
        address: n.address,
        dma: n.dma,
        meter_book: n.meter_book,
        customer_account: n.customer_account,
        customer_class: n.customer_class,
        persons: n.persons,
        has_valve: n.has_valve,
        gateway_id: n.gateway_id,
        ..MeterInput::default()
    };
    registry::register(&s.pool, &input, &p.actor()).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(MeterChanged {
            meter_id: n.meter_id,
            status: Status::InStock.as_str().to_owned(),
        }),
    ))
}

/// When something happened (default: now).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct At {
    /// RFC 3339; default now.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub at: Option<OffsetDateTime>,
}

async fn target(s: &AppState, p: &Principal, meter: &str) -> Result<String, ApiError> {
    p.require(rbac::METERS_WRITE)?;
    Ok(meter_in_scope(&s.pool, &p.scope, meter).await?.meter_id)
}

fn changed(meter_id: String, status: Status) -> axum::Json<MeterChanged> {
    axum::Json(MeterChanged {
        meter_id,
        status: status.as_str().to_owned(),
    })
}

/// IF-METER-002: install a meter from stock.
#[utoipa::path(post, path = "/api/v1/meters/{meter}/install", tag = "IF-METER-002",
    params(("meter" = String, Path)), request_body = At, security(("bearer" = [])),
    responses((status = 200, body = MeterChanged), (status = 409, body = Problem)))]
async fn install(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiJson(at): ApiJson<At>,
) -> Result<axum::Json<MeterChanged>, ApiError> {
    let id = target(&s, &p, &meter).await?;
    let at = at.at.unwrap_or_else(OffsetDateTime::now_utc);
    let st = registry::install(&s.pool, &id, at, &p.actor()).await?;
    Ok(changed(id, st))
}

/// IF-METER-002: commission an installed meter (or return a repaired one to service).
#[utoipa::path(post, path = "/api/v1/meters/{meter}/activate", tag = "IF-METER-002",
    params(("meter" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = MeterChanged), (status = 409, body = Problem)))]
async fn activate(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
) -> Result<axum::Json<MeterChanged>, ApiError> {
    let id = target(&s, &p, &meter).await?;
    let st = registry::activate(&s.pool, &id, &p.actor()).await?;
    Ok(changed(id, st))
}

/// Why a meter is faulty.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// The reason.
    pub reason: String,
}

/// IF-METER-002: mark a meter faulty.
#[utoipa::path(post, path = "/api/v1/meters/{meter}/faulty", tag = "IF-METER-002",
    params(("meter" = String, Path)), request_body = Fault, security(("bearer" = [])),
    responses((status = 200, body = MeterChanged), (status = 409, body = Problem),
        (status = 422, body = Problem)))]
async fn mark_faulty(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiJson(f): ApiJson<Fault>,
) -> Result<axum::Json<MeterChanged>, ApiError> {
    let id = target(&s, &p, &meter).await?;
    let st = registry::mark_faulty(&s.pool, &id, &f.reason, &p.actor()).await?;
    Ok(changed(id, st))
}

/// IF-METER-002: retire a meter (high-risk: meter admin with a second factor).
#[utoipa::path(post, path = "/api/v1/meters/{meter}/retire", tag = "IF-METER-002",
    params(("meter" = String, Path)), request_body = At, security(("bearer" = [])),
    responses((status = 200, body = MeterChanged), (status = 403, body = Problem),
        (status = 409, body = Problem)))]
async fn retire(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiJson(at): ApiJson<At>,
) -> Result<axum::Json<MeterChanged>, ApiError> {
    p.require(rbac::METERS_RETIRE)?;
    p.require_second_factor(Action::MeterRetire, &s.config.second_factor_actions)?;
    let id = meter_in_scope(&s.pool, &p.scope, &meter).await?.meter_id;
    let at = at.at.unwrap_or_else(OffsetDateTime::now_utc);
    let st = registry::retire(&s.pool, &id, at, &p.actor()).await?;
    Ok(changed(id, st))
}

/// A device swap.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaceRequest {
    /// When (default now).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub at: Option<OffsetDateTime>,
    /// Final register of the old device, m³.
    #[schema(value_type = String)]
    pub old_final: Decimal,
    /// Initial register of the new device, m³.
    #[schema(value_type = String)]
    pub new_initial: Decimal,
    /// The new device's meter number when it has its own registration.
    pub successor: Option<String>,
}

/// What a replacement did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Replaced {
    /// Meter id.
    pub meter_id: String,
    /// Held reads validated again.
    pub revalidated: u64,
    /// Held reads still rejected.
    pub still_rejected: u64,
}

/// IF-METER-002: replace a meter's device.
#[utoipa::path(post, path = "/api/v1/meters/{meter}/replace", tag = "IF-METER-002",
    params(("meter" = String, Path)), request_body = ReplaceRequest, security(("bearer" = [])),
    responses((status = 200, body = Replaced), (status = 409, body = Problem),
        (status = 422, body = Problem)))]
async fn replace(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiJson(r): ApiJson<ReplaceRequest>,
) -> Result<axum::Json<Replaced>, ApiError> {
    let id = target(&s, &p, &meter).await?;
    if let Some(succ) = &r.successor {
        meter_in_scope(&s.pool, &p.scope, succ).await?;
    }
    let out = registry::replace(
        &s.pool,
        &id,
        &Replacement {
            at: r.at.unwrap_or_else(OffsetDateTime::now_utc),
            old_final: r.old_final,
            new_initial: r.new_initial,
            successor: r.successor,
        },
        &p.actor(),
    )
    .await?;
    Ok(axum::Json(Replaced {
        meter_id: id,
        revalidated: out.revalidated,
        still_rejected: out.still_rejected,
    }))
}

/// A customer binding.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// Customer account.
    pub account: String,
    /// When (default now).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub at: Option<OffsetDateTime>,
}

/// Whether anything changed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Changed {
    /// True when the request changed the registry.
    pub changed: bool,
}

/// IF-METER-002: bind a customer account to the meter.
#[utoipa::path(put, path = "/api/v1/meters/{meter}/customer", tag = "IF-METER-002",
    params(("meter" = String, Path)), request_body = Binding, security(("bearer" = [])),
    responses((status = 200, body = Changed), (status = 422, body = Problem)))]
async fn bind_customer(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiJson(b): ApiJson<Binding>,
) -> Result<axum::Json<Changed>, ApiError> {
    let id = target(&s, &p, &meter).await?;
    let at = b.at.unwrap_or_else(OffsetDateTime::now_utc);
    let changed = registry::bind_customer(&s.pool, &id, &b.account, at, &p.actor()).await?;
    Ok(axum::Json(Changed { changed }))
}

/// IF-METER-002: end the meter's customer binding.
#[utoipa::path(delete, path = "/api/v1/meters/{meter}/customer", tag = "IF-METER-002",
    params(("meter" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = Changed), (status = 404, body = Problem)))]
async fn unbind_customer(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
) -> Result<axum::Json<Changed>, ApiError> {
    let id = target(&s, &p, &meter).await?;
    let changed =
        registry::unbind_customer(&s.pool, &id, OffsetDateTime::now_utc(), &p.actor()).await?;
    Ok(axum::Json(Changed { changed }))
}

/// A meter book to move to.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BookMove {
    /// Book code.
    pub book: String,
}

/// IF-METER-002: move the meter to another meter book.
#[utoipa::path(put, path = "/api/v1/meters/{meter}/book", tag = "IF-METER-002",
    params(("meter" = String, Path)), request_body = BookMove, security(("bearer" = [])),
    responses((status = 200, body = Changed), (status = 422, body = Problem)))]
async fn move_book(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiJson(b): ApiJson<BookMove>,
) -> Result<axum::Json<Changed>, ApiError> {
    let id = target(&s, &p, &meter).await?;
    registry::move_book(&s.pool, &id, &b.book, &p.actor()).await?;
    Ok(axum::Json(Changed { changed: true }))
}
