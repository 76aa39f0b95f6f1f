//! Read endpoints of the dashboard (issue 23): fleet summary, gateways with their health, DMA
//! water balance series, hydrants with state, pressure and permits, the command list and bill
//! runs with progress. Read-only, RBAC and data scope like the other routes.

use std::collections::BTreeMap;

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
use crate::routes::{Page, Paged, scope_sql};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(fleet_summary))
        .routes(routes!(gateways))
        .routes(routes!(dma_balance))
        .routes(routes!(hydrants))
        .routes(routes!(list_commands))
        .routes(routes!(bill_runs))
}

/// A count under a key.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Count {
    /// The key (status, protocol, bucket...).
    pub key: String,
    /// How many meters.
    pub count: i64,
}

/// The fleet at a glance.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FleetSummary {
    /// Meters in the caller's scope.
    pub meters: i64,
    /// By registry status (`active`, `installed`, `faulty`...).
    pub by_status: Vec<Count>,
    /// By protocol (`cjt188`, `mbus`, `wmbus`, `modbus`...).
    pub by_protocol: Vec<Count>,
    /// Communication health of meters in service: `ok` (heard within 26 h), `late` (26..72 h),
    /// `silent` (longer), `never`.
    pub comm_health: Vec<Count>,
    /// Time since last heard: `lt_1h`, `1h_6h`, `6h_24h`, `1d_3d`, `gt_3d`, `never`.
    pub last_seen: Vec<Count>,
    /// Signal quality (newest NB-IoT RSRP of the last 2 days): `good` (≥ −100 dBm), `fair`
    /// (−110..−100), `poor` (< −110); meters without RSRP are not counted.
    pub signal: Vec<Count>,
    /// Open (not closed) alarms in scope by severity.
    pub open_alarms: Vec<Count>,
    /// Gateways `online`, `offline`, `unknown` (never reported).
    pub gateways: Vec<Count>,
}

/// Refuses a filter value PostgreSQL text cannot hold (NUL) or that is absurdly long.
fn filter(field: &'static str, v: Option<&String>) -> Result<(), ApiError> {
    match v {
        Some(v) if v.len() > 200 || v.contains('\0') => {
            Err(ApiError::field(field, "at most 200 characters, no NUL"))
        }
        _ => Ok(()),
    }
}

fn counts(map: BTreeMap<String, i64>, order: &[&str]) -> Vec<Count> {
    let mut out: Vec<Count> = order
        .iter()
        .map(|k| Count {
            key: (*k).to_owned(),
            count: map.get(*k).copied().unwrap_or(0),
        })
        .collect();
    for (k, v) in map {
        if !order.contains(&k.as_str()) {
            out.push(Count { key: k, count: v });
        }
    }
    out
}

/// Fleet overview: meters by status, protocol, communication health, last seen and signal.
#[utoipa::path(get, path = "/api/v1/fleet/summary", tag = "DASHBOARD", security(("bearer" = [])),
    responses((status = 200, body = FleetSummary), (status = 403, body = Problem)))]
async fn fleet_summary(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> Result<axum::Json<FleetSummary>, ApiError> {
    p.require(rbac::DASHBOARD_READ)?;
    let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(&format!(
        "WITH x AS (
             SELECT m.status, m.protocol,
                    GREATEST(st.last_received_at, f.received_at) AS seen
             FROM meters m
             LEFT JOIN meter_state st ON st.meter_id = m.meter_id
             LEFT JOIN meter_last_frame f ON f.meter_id = m.meter_id
             WHERE {})
         SELECT status, protocol,
                CASE WHEN status IN ('in_stock', 'retired', 'replaced') THEN 'not_in_service'
                     WHEN seen IS NULL THEN 'never'
                     WHEN seen > now() - interval '26 hours' THEN 'ok'
                     WHEN seen > now() - interval '72 hours' THEN 'late'
                     ELSE 'silent' END,
                CASE WHEN seen IS NULL THEN 'never'
                     WHEN seen > now() - interval '1 hour' THEN 'lt_1h'
                     WHEN seen > now() - interval '6 hours' THEN '1h_6h'
                     WHEN seen > now() - interval '24 hours' THEN '6h_24h'
                     WHEN seen > now() - interval '72 hours' THEN '1d_3d'
                     ELSE 'gt_3d' END,
                count(*)
         FROM x GROUP BY 1, 2, 3, 4",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("summarising the fleet"))?;
    let (mut st, mut pr, mut health, mut seen) = (
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
    );
    let mut total = 0;
    for (status, protocol, h, ls, n) in rows {
        total += n;
        *st.entry(status).or_insert(0) += n;
        *pr.entry(protocol).or_insert(0) += n;
        if h != "not_in_service" {
            *health.entry(h).or_insert(0) += n;
        }
        *seen.entry(ls).or_insert(0) += n;
    }
    let signal: Vec<(String, i64)> = sqlx::query_as(&format!(
        "WITH last AS (
             SELECT DISTINCT ON (r.meter_id) r.value
             FROM readings r JOIN meters m ON m.meter_id = r.meter_id
             WHERE r.quantity = 'signal_rsrp' AND r.ts > now() - interval '2 days' AND {}
             ORDER BY r.meter_id, r.ts DESC)
         SELECT CASE WHEN value >= -100 THEN 'good' WHEN value >= -110 THEN 'fair' ELSE 'poor' END,
                count(*) FROM last GROUP BY 1",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("summarising signal quality"))?;
    let alarms: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT a.severity, count(*) FROM alarms a LEFT JOIN meters m ON m.meter_id = a.meter_id
         WHERE a.state <> 'closed'
           AND (($1::text IS NULL AND $2::text[] IS NULL) OR (m.meter_id IS NOT NULL AND {}))
         GROUP BY 1",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("counting open alarms"))?;
    let gws = gateway_rows(&s, &p.scope).await?;
    let mut g = BTreeMap::new();
    for r in &gws {
        let k = match r.online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "unknown",
        };
        *g.entry(k.to_owned()).or_insert(0) += 1;
    }
    Ok(axum::Json(FleetSummary {
        meters: total,
        by_status: counts(
            st,
            &[
                "active",
                "installed",
                "faulty",
                "in_stock",
                "replaced",
                "retired",
            ],
        ),
        by_protocol: counts(pr, &[]),
        comm_health: counts(health, &["ok", "late", "silent", "never"]),
        last_seen: counts(
            seen,
            &["lt_1h", "1h_6h", "6h_24h", "1d_3d", "gt_3d", "never"],
        ),
        signal: counts(signal.into_iter().collect(), &["good", "fair", "poor"]),
        open_alarms: counts(
            alarms.into_iter().collect(),
            &["critical", "warning", "info"],
        ),
        gateways: counts(g, &["online", "offline", "unknown"]),
    }))
}

/// A gateway with its health.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct GatewayView {
    /// Id.
    pub gateway_id: String,
    /// Last reported state (`None`: never reported).
    pub online: Option<bool>,
    /// Last status message.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    /// Firmware version.
    pub firmware: Option<String>,
    /// Readings waiting in the gateway's spool (last health report).
    pub spool_depth: Option<i64>,
    /// Age of the oldest unacknowledged reading, seconds (last health report).
    pub uplink_lag_s: Option<f64>,
    /// Time of the last health report.
    #[serde(with = "time::serde::rfc3339::option")]
    pub health_at: Option<OffsetDateTime>,
    /// Meters the registry assigns to it (in the caller's scope).
    pub meters: i64,
    /// Device set version published / applied.
    pub device_set_version: i64,
    /// Device set version the gateway reported applied.
    pub device_set_applied: Option<i64>,
}

async fn gateway_rows(
    s: &AppState,
    scope: &crate::auth::Scope,
) -> Result<Vec<GatewayView>, ApiError> {
    // A scoped caller sees the gateways that serve at least one of its meters.
    sqlx::query_as(&format!(
        "SELECT g.gateway_id, g.online, g.last_seen, g.firmware, g.spool_depth, g.uplink_lag_s,
                g.health_at, coalesce(n.meters, 0) AS meters, g.device_set_version,
                g.device_set_applied
         FROM gateways g
         LEFT JOIN (SELECT m.gateway_id, count(*) AS meters FROM meters m WHERE {}
                    GROUP BY 1) n ON n.gateway_id = g.gateway_id
         WHERE ($1::text IS NULL AND $2::text[] IS NULL) OR n.meters > 0
         ORDER BY g.gateway_id",
        scope_sql(1, 2)
    ))
    .bind(&scope.org)
    .bind(scope.areas_param())
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("listing gateways"))
}

/// Gateways: online/offline, last seen, firmware, spool depth and uplink lag.
#[utoipa::path(get, path = "/api/v1/gateways", tag = "DASHBOARD", security(("bearer" = [])),
    responses((status = 200, body = Vec<GatewayView>), (status = 403, body = Problem)))]
async fn gateways(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> Result<axum::Json<Vec<GatewayView>>, ApiError> {
    p.require(rbac::DASHBOARD_READ)?;
    Ok(axum::Json(gateway_rows(&s, &p.scope).await?))
}

/// DMA balance query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BalanceQuery {
    /// Days back from today (1..366, default 30).
    pub days: Option<i64>,
    /// One DMA only.
    pub dma: Option<String>,
}

/// One day of a DMA's balance (m³).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BalanceDay {
    /// The local day of the rollups.
    pub day: String,
    /// Σ inlet − Σ outlet meters.
    pub inflow: f64,
    /// Σ customer meters from actual reads (metered).
    pub metered: f64,
    /// Σ customer meter-days with estimated reads (billed, not metered).
    pub estimated: f64,
    /// (inflow − metered − estimated) / inflow; absent when the inflow is not positive.
    pub loss_share: Option<f64>,
    /// Customer meters with a rollup that day / customer meters of the DMA.
    pub coverage: f64,
}

/// A DMA's balance series.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DmaBalance {
    /// The DMA.
    pub dma: String,
    /// Customer meters in it.
    pub customer_meters: i64,
    /// Days, oldest first.
    pub days: Vec<BalanceDay>,
}

/// DMA water balance per day: inflow against metered and estimated consumption, loss share
/// (the same arithmetic as the `dma_imbalance` detector, docs/detectors.md).
#[utoipa::path(get, path = "/api/v1/dma/balance", tag = "DASHBOARD", params(BalanceQuery),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<DmaBalance>), (status = 403, body = Problem),
        (status = 422, body = Problem)))]
async fn dma_balance(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(q): ApiQuery<BalanceQuery>,
) -> Result<axum::Json<Vec<DmaBalance>>, ApiError> {
    p.require(rbac::DASHBOARD_READ)?;
    filter("dma", q.dma.as_ref())?;
    let days = q.days.unwrap_or(30);
    if !(1..=366).contains(&days) {
        return Err(ApiError::field("days", "must be 1..366"));
    }
    let meters: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT m.dma, count(*) FILTER (WHERE m.role = 'customer') FROM meters m
         WHERE m.dma IS NOT NULL AND ($3::text IS NULL OR m.dma = $3) AND {}
         GROUP BY 1 ORDER BY 1",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .bind(&q.dma)
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("listing DMAs"))?;
    let rows: Vec<(String, time::Date, f64, f64, f64, i64)> = sqlx::query_as(&format!(
        "SELECT m.dma, d.bucket,
                coalesce(sum(d.consumption) FILTER (WHERE m.role = 'inlet'), 0)::float8
                  - coalesce(sum(d.consumption) FILTER (WHERE m.role = 'outlet'), 0)::float8,
                coalesce(sum(d.consumption) FILTER (WHERE m.role = 'customer' AND NOT d.estimated), 0)::float8,
                coalesce(sum(d.consumption) FILTER (WHERE m.role = 'customer' AND d.estimated), 0)::float8,
                count(*) FILTER (WHERE m.role = 'customer')
         FROM rollup_daily d JOIN meters m ON m.meter_id = d.meter_id
         WHERE m.dma IS NOT NULL AND ($3::text IS NULL OR m.dma = $3)
           AND d.bucket >= current_date - $4::int AND {}
         GROUP BY 1, 2 ORDER BY 1, 2",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .bind(&q.dma)
    .bind(i32::try_from(days).unwrap_or(30))
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("computing DMA balances"))?;
    let mut out: Vec<DmaBalance> = meters
        .into_iter()
        .map(|(dma, n)| DmaBalance {
            dma,
            customer_meters: n,
            days: Vec::new(),
        })
        .collect();
    for (dma, day, inflow, metered, estimated, covered) in rows {
        let Some(b) = out.iter_mut().find(|b| b.dma == dma) else {
            continue;
        };
        #[allow(clippy::cast_precision_loss)] // meter counts are far below 2^52
        let coverage = if b.customer_meters > 0 {
            covered as f64 / b.customer_meters as f64
        } else {
            0.0
        };
        b.days.push(BalanceDay {
            day: day.to_string(),
            inflow,
            metered,
            estimated,
            loss_share: (inflow > 0.0).then(|| (inflow - metered - estimated) / inflow),
            coverage,
        });
    }
    Ok(axum::Json(out))
}

/// A hydrant permit, as the hydrant list shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PermitView {
    /// Permit id.
    pub permit_id: String,
    /// Holder.
    pub holder: String,
    /// Window start.
    pub valid_from: String,
    /// Window end.
    pub valid_to: String,
    /// Revoked at.
    pub revoked_at: Option<String>,
    /// Active now.
    pub active: bool,
}

/// A hydrant with its state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HydrantView {
    /// Meter id (`hydrant:<id>`).
    pub meter_id: String,
    /// Meter number.
    pub meter_no: Option<String>,
    /// Latitude.
    pub latitude: Option<f64>,
    /// Longitude.
    pub longitude: Option<f64>,
    /// Address.
    pub address: Option<String>,
    /// `open` / `closed` (newest `outlet_state` read), absent before the first report.
    pub outlet: Option<String>,
    /// Newest pressure read, bar.
    pub pressure_bar: Option<f64>,
    /// When the newest state or pressure was read.
    pub reported_at: Option<String>,
    /// Open alarms on the hydrant.
    pub open_alarms: i64,
    /// Permits not ended more than a day ago, newest window first (at most 5).
    pub permits: Vec<PermitView>,
}

type HydrantRow = (
    String,
    Option<String>,
    Option<f64>,
    Option<f64>,
    Option<String>,
    Option<f64>,
    Option<f64>,
    Option<OffsetDateTime>,
    i64,
    serde_json::Value,
);

/// Hydrants (role `hydrant` or id `hydrant:…`): position, outlet state, pressure and permits.
#[utoipa::path(get, path = "/api/v1/hydrants", tag = "EXT-1001", security(("bearer" = [])),
    responses((status = 200, body = Vec<HydrantView>), (status = 403, body = Problem)))]
async fn hydrants(
    State(s): State<AppState>,
    Auth(p): Auth,
) -> Result<axum::Json<Vec<HydrantView>>, ApiError> {
    p.require(rbac::COMMANDS_READ)?;
    let rows: Vec<HydrantRow> = sqlx::query_as(&format!(
        "SELECT m.meter_id, m.meter_no, m.latitude::float8, m.longitude::float8, m.address,
                o.value::float8, pr.value::float8, GREATEST(o.ts, pr.ts),
                (SELECT count(*) FROM alarms a WHERE a.meter_id = m.meter_id AND a.state <> 'closed'),
                coalesce((SELECT json_agg(json_build_object(
                        'permit_id', x.permit_id, 'holder', x.holder,
                        'valid_from', to_char(x.valid_from AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        'valid_to', to_char(x.valid_to AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        'revoked_at', to_char(x.revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        'active', x.revoked_at IS NULL AND now() >= x.valid_from AND now() < x.valid_to))
                    FROM (SELECT * FROM hydrant_permits hp WHERE hp.hydrant_id = m.meter_id
                            AND hp.valid_to > now() - interval '1 day'
                          ORDER BY hp.valid_from DESC LIMIT 5) x), '[]'::json)::jsonb
         FROM meters m
         LEFT JOIN LATERAL (SELECT r.value, r.ts FROM readings r WHERE r.meter_id = m.meter_id
                            AND r.quantity = 'outlet_state' ORDER BY r.ts DESC LIMIT 1) o ON true
         LEFT JOIN LATERAL (SELECT r.value, r.ts FROM readings r WHERE r.meter_id = m.meter_id
                            AND r.quantity = 'pressure' ORDER BY r.ts DESC LIMIT 1) pr ON true
         WHERE (m.role = 'hydrant' OR m.meter_id LIKE 'hydrant:%') AND {}
         ORDER BY m.meter_id LIMIT 2000",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("listing hydrants"))?;
    let out = rows
        .into_iter()
        .map(
            |(meter_id, meter_no, lat, lon, address, outlet, pressure, at, alarms, permits)| {
                HydrantView {
                    meter_id,
                    meter_no,
                    latitude: lat,
                    longitude: lon,
                    address,
                    outlet: outlet.map(|v| if v >= 0.5 { "open" } else { "closed" }.to_owned()),
                    pressure_bar: pressure,
                    reported_at: at.map(rfc3339),
                    open_alarms: alarms,
                    permits: serde_json::from_value(permits).unwrap_or_default(),
                }
            },
        )
        .collect();
    Ok(axum::Json(out))
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Command list filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CommandFilter {
    /// State (`queued`, `sent`, `delivered`, `acknowledged`, `confirmed`, `failed`, ...).
    pub state: Option<String>,
    /// Device (meter id).
    pub device: Option<String>,
    /// Action type (`valve_close`, `hydrant_unlock`, ...).
    pub action: Option<String>,
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip.
    pub offset: Option<i64>,
}

/// A command in the list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandItem {
    /// Id.
    pub id: String,
    /// Device (meter id).
    pub device: String,
    /// Serving gateway.
    pub gateway: String,
    /// Action type.
    pub action_type: String,
    /// State.
    pub state: String,
    /// Who issued it.
    pub issued_by: String,
    /// Why.
    pub reason: String,
    /// When issued.
    pub issued_at: String,
    /// Last change.
    pub updated_at: String,
}

type CommandRow = (
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    OffsetDateTime,
    OffsetDateTime,
);

/// Commands in the caller's scope, newest first, filtered by state, device and action.
#[utoipa::path(get, path = "/api/v1/commands", tag = "EXT-1001", params(CommandFilter),
    security(("bearer" = [])),
    responses((status = 200, body = Paged<CommandItem>), (status = 403, body = Problem),
        (status = 422, body = Problem)))]
async fn list_commands(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(q): ApiQuery<CommandFilter>,
) -> Result<axum::Json<Paged<CommandItem>>, ApiError> {
    p.require(rbac::COMMANDS_READ)?;
    filter("state", q.state.as_ref())?;
    filter("device", q.device.as_ref())?;
    filter("action", q.action.as_ref())?;
    let (limit, offset) = Page {
        limit: q.limit,
        offset: q.offset,
    }
    .resolve(s.config.max_page)?;
    let rows: Vec<CommandRow> = sqlx::query_as(&format!(
        "SELECT c.command_id, c.device_id, c.gateway_id, c.action->>'type', c.state, c.issued_by,
                c.reason, c.issued_at, c.updated_at
         FROM commands c JOIN meters m ON m.meter_id = c.device_id
         WHERE {} AND ($3::text IS NULL OR c.state = $3) AND ($4::text IS NULL OR c.device_id = $4)
           AND ($5::text IS NULL OR c.action->>'type' = $5)
         ORDER BY c.issued_at DESC, c.command_id LIMIT $6 OFFSET $7",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .bind(&q.state)
    .bind(&q.device)
    .bind(&q.action)
    .bind(limit)
    .bind(offset)
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("listing commands"))?;
    let items = rows
        .into_iter()
        .map(
            |(id, device, gateway, action, state, issued_by, reason, issued, updated)| {
                CommandItem {
                    id,
                    device,
                    gateway,
                    action_type: action.unwrap_or_else(|| "unknown".into()),
                    state,
                    issued_by,
                    reason,
                    issued_at: rfc3339(issued),
                    updated_at: rfc3339(updated),
                }
            },
        )
        .collect();
    Ok(axum::Json(Paged::new(items, limit, offset)))
}

/// A bill run with its progress.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BillRunView {
    /// Run id.
    pub run_id: i64,
    /// Cycle id.
    pub cycle_id: i64,
    /// Meter book.
    pub book: String,
    /// Period start (inclusive).
    pub period_start: String,
    /// Period end (exclusive).
    pub period_end: String,
    /// Who started it.
    pub actor: String,
    /// Started.
    pub started_at: String,
    /// Finished (absent while running).
    pub finished_at: Option<String>,
    /// New original bills.
    pub created: i32,
    /// Adjustment bills.
    pub adjusted: i32,
    /// Meters whose bill already stood.
    pub unchanged: i32,
    /// Meters not billed.
    pub skipped: i32,
    /// Meters of the book (the denominator of progress).
    pub book_meters: i64,
    /// (created + adjusted + unchanged + skipped) / book meters, 0..1 (1 once finished).
    pub progress: f64,
}

type RunRow = (
    i64,
    i64,
    String,
    time::Date,
    time::Date,
    String,
    OffsetDateTime,
    Option<OffsetDateTime>,
    i32,
    i32,
    i32,
    i32,
    i64,
);

/// Bill runs, newest first, with progress.
#[utoipa::path(get, path = "/api/v1/bill-runs", tag = "IF-REV-005", params(Page),
    security(("bearer" = [])),
    responses((status = 200, body = Paged<BillRunView>), (status = 403, body = Problem)))]
async fn bill_runs(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<axum::Json<Paged<BillRunView>>, ApiError> {
    p.require(rbac::BILLS_READ)?;
    let (limit, offset) = page.resolve(s.config.max_page)?;
    // Scope: a scoped caller sees runs of books that hold at least one of its meters.
    let rows: Vec<RunRow> = sqlx::query_as(&format!(
        "SELECT r.run_id, r.cycle_id, c.meter_book, c.period_start, c.period_end, r.actor,
                r.started_at, r.finished_at, r.created, r.adjusted, r.unchanged, r.skipped,
                (SELECT count(*) FROM meters b WHERE b.meter_book = c.meter_book)
         FROM bill_runs r JOIN billing_cycles c ON c.cycle_id = r.cycle_id
         WHERE ($1::text IS NULL AND $2::text[] IS NULL)
            OR EXISTS (SELECT 1 FROM meters m WHERE m.meter_book = c.meter_book AND {})
         ORDER BY r.started_at DESC, r.run_id DESC LIMIT $3 OFFSET $4",
        scope_sql(1, 2)
    ))
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .bind(limit)
    .bind(offset)
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("listing bill runs"))?;
    let items = rows
        .into_iter()
        .map(
            |(run_id, cycle_id, book, from, to, actor, started, finished, cr, ad, un, sk, n)| {
                let done = i64::from(cr) + i64::from(ad) + i64::from(un) + i64::from(sk);
                #[allow(clippy::cast_precision_loss)] // meter counts are far below 2^52
                let progress = if finished.is_some() {
                    1.0
                } else if n > 0 {
                    (done as f64 / n as f64).min(1.0)
                } else {
                    0.0
                };
                BillRunView {
                    run_id,
                    cycle_id,
                    book,
                    period_start: from.to_string(),
                    period_end: to.to_string(),
                    actor,
                    started_at: rfc3339(started),
                    finished_at: finished.map(rfc3339),
                    created: cr,
                    adjusted: ad,
                    unchanged: un,
                    skipped: sk,
                    book_meters: n,
                    progress,
                }
            },
        )
        .collect();
    Ok(axum::Json(Paged::new(items, limit, offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_keep_the_given_order_with_zeros_and_append_the_rest() {
        let mut m = BTreeMap::new();
        m.insert("late".to_owned(), 2);
        m.insert("weird".to_owned(), 1);
        m.insert("ok".to_owned(), 5);
        let c = counts(m, &["ok", "late", "silent"]);
        let keys: Vec<_> = c.iter().map(|c| (c.key.as_str(), c.count)).collect();
        assert_eq!(keys, [("ok", 5), ("late", 2), ("silent", 0), ("weird", 1)]);
    }
}
