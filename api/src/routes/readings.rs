//! EXT-601 readings of a meter (raw, hourly and daily rollups; JSON pages or CSV) and the
//! audited edit of a stored read.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use model::Quantity;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Action;
use crate::error::{ApiError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Auth};
use crate::rbac;
use crate::routes::{Page, Paged, meter_in_scope};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(readings))
        .routes(routes!(edit_reading))
}

/// Resolution of a readings query.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Every stored read.
    #[default]
    Raw,
    /// Hourly rollups.
    Hourly,
    /// Daily rollups.
    Daily,
}

/// Output format.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// JSON page.
    #[default]
    Json,
    /// CSV (the page's rows, with a header line).
    Csv,
}

/// Readings query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReadingsQuery {
    /// From (inclusive), RFC 3339; default 7 days before `to`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>)]
    pub from: Option<OffsetDateTime>,
    /// To (exclusive), RFC 3339; default now.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>)]
    pub to: Option<OffsetDateTime>,
    /// `raw`, `hourly` or `daily`.
    #[param(value_type = Option<String>)]
    pub resolution: Option<Resolution>,
    /// Raw reads only: the quantity (default every quantity).
    #[param(value_type = Option<String>)]
    pub quantity: Option<Quantity>,
    /// `json` (default) or `csv` (also chosen by `Accept: text/csv`).
    #[param(value_type = Option<String>)]
    pub format: Option<Format>,
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip.
    pub offset: Option<i64>,
}

/// One row: a raw read or a rollup bucket.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadingRow {
    /// Read time, or the bucket's start.
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    /// Quantity (raw) or `consumption` (rollups).
    pub quantity: String,
    /// Register value (raw) or consumption in the bucket (rollups), decimal string.
    #[schema(value_type = String)]
    pub value: Decimal,
    /// Unit.
    pub unit: String,
    /// Quality status (`actual`, `validated`, `estimated`, `edited`, `rejected`, ...); for
    /// rollups `estimated` when an estimate contributed, else `validated`.
    pub quality: String,
    /// Quality flags.
    pub flags: Vec<String>,
    /// Raw: tariff register; rollups: number of reads in the bucket.
    pub count_or_tariff: i32,
}

/// EXT-601 水表数据采集: readings of a meter over a time range, raw or from the hourly and
/// daily rollups, with quality flags; paginated; CSV with `format=csv`.
#[utoipa::path(get, path = "/api/v1/meters/{meter}/readings", tag = "EXT-601",
    params(("meter" = String, Path, description = "meter number or id"), ReadingsQuery),
    security(("bearer" = [])),
    responses((status = 200, body = Paged<ReadingRow>, content_type = "application/json"),
        (status = 200, body = String, content_type = "text/csv"),
        (status = 400, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn readings(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadingsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    p.require(rbac::READINGS_READ)?;
    let (limit, offset) = Page {
        limit: q.limit,
        offset: q.offset,
    }
    .resolve(s.config.max_page)?;
    let to = q.to.unwrap_or_else(OffsetDateTime::now_utc);
    let from = q.from.unwrap_or(to - time::Duration::days(7));
    if from >= to {
        return Err(ApiError::field("from", "must be before to"));
    }
    let resolution = q.resolution.unwrap_or_default();
    if q.quantity.is_some() && resolution != Resolution::Raw {
        return Err(ApiError::field("quantity", "only with resolution=raw"));
    }
    let m = meter_in_scope(&s.pool, &p.scope, &meter).await?;
    let rows = match resolution {
        Resolution::Raw => {
            type Raw = (
                OffsetDateTime,
                String,
                Decimal,
                String,
                String,
                Vec<String>,
                i16,
            );
            let rows: Vec<Raw> = sqlx::query_as(
                "SELECT ts, quantity, value, unit, quality, flags, tariff FROM readings
                 WHERE meter_id = $1 AND ts >= $2 AND ts < $3 AND ($4::text IS NULL OR quantity = $4)
                 ORDER BY ts, quantity, tariff, subunit LIMIT $5 OFFSET $6",
            )
            .bind(&m.meter_id)
            .bind(from)
            .bind(to)
            .bind(q.quantity.map(|q| q.as_str()))
            .bind(limit)
            .bind(offset)
            .fetch_all(&s.pool)
            .await
            .map_err(ApiError::db("reading raw reads"))?;
            rows.into_iter()
                .map(
                    |(ts, quantity, value, unit, quality, flags, tariff)| ReadingRow {
                        ts,
                        quantity,
                        value: value.normalize(),
                        unit,
                        quality,
                        flags,
                        count_or_tariff: i32::from(tariff),
                    },
                )
                .collect::<Vec<_>>()
        }
        Resolution::Hourly | Resolution::Daily => {
            let sql = if resolution == Resolution::Hourly {
                // Derived from the meter's reads in the range (not folded on ingest: migration
                // 0151), with the rollups' span logic.
                "SELECT bucket, consumption, read_count, estimated FROM wm_rollup_hourly($1, $2, $3)
                 ORDER BY bucket LIMIT $4 OFFSET $5"
            } else {
                // Daily buckets are UTC dates of the rollup; compared as timestamps at 00:00 UTC.
                "SELECT (bucket::timestamp AT TIME ZONE 'UTC') AS bucket, consumption, read_count, estimated
                 FROM rollup_daily
                 WHERE meter_id = $1 AND bucket >= ($2 AT TIME ZONE 'UTC')::date
                   AND bucket < ($3 AT TIME ZONE 'UTC')::date
                 ORDER BY bucket LIMIT $4 OFFSET $5"
            };
            let rows: Vec<(OffsetDateTime, Decimal, i32, bool)> = sqlx::query_as(sql)
                .bind(&m.meter_id)
                .bind(from)
                .bind(to)
                .bind(limit)
                .bind(offset)
                .fetch_all(&s.pool)
                .await
                .map_err(ApiError::db("reading rollups"))?;
            rows.into_iter()
                .map(|(ts, value, count, estimated)| ReadingRow {
                    ts,
                    quantity: "consumption".into(),
                    value: value.normalize(),
                    unit: "m3".into(),
                    quality: if estimated { "estimated" } else { "validated" }.into(),
                    flags: Vec::new(),
                    count_or_tariff: count,
                })
                .collect()
        }
    };
    let wants_csv = q.format == Some(Format::Csv)
        || (q.format.is_none()
            && headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/csv")));
    if wants_csv {
        let mut out =
            String::from("meter_id,ts,quantity,value,unit,quality,flags,count_or_tariff\n");
        for r in &rows {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                csv_field(&m.meter_id),
                r.ts.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                csv_field(&r.quantity),
                r.value,
                csv_field(&r.unit),
                csv_field(&r.quality),
                csv_field(&r.flags.join(";")),
                r.count_or_tariff
            ));
        }
        let mut resp = out.into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        return Ok(resp);
    }
    Ok(axum::Json(Paged::new(rows, limit, offset)).into_response())
}

/// RFC 4180 quoting, and a leading `'` before `= + - @` so a spreadsheet never evaluates a
/// field as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// An edit of a stored read.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadEdit {
    /// Time of the read to edit, RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    /// Quantity (default `volume`).
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub quantity: Option<Quantity>,
    /// The new value.
    #[schema(value_type = String)]
    pub value: Decimal,
    /// Why (audited).
    pub reason: String,
}

/// What an edit replaced.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadEdited {
    /// Value before.
    #[schema(value_type = String)]
    pub old_value: Decimal,
    /// Quality before.
    pub old_quality: String,
}

/// Edit a stored read (high-risk: meter admin with a second factor; audited, history kept).
#[utoipa::path(post, path = "/api/v1/meters/{meter}/readings/edit", tag = "EXT-601",
    params(("meter" = String, Path)), request_body = ReadEdit, security(("bearer" = [])),
    responses((status = 200, body = ReadEdited), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn edit_reading(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiPath(meter): ApiPath<String>,
    ApiJson(e): ApiJson<ReadEdit>,
) -> Result<axum::Json<ReadEdited>, ApiError> {
    p.require(rbac::READINGS_EDIT)?;
    p.require_second_factor(Action::ReadEdit, &s.config.second_factor_actions)?;
    if e.reason.trim().is_empty() {
        return Err(ApiError::field("reason", "say why the read is edited"));
    }
    let m = meter_in_scope(&s.pool, &p.scope, &meter).await?;
    let out = pipeline::edit::edit_reading(
        &s.pool,
        &m.meter_id,
        e.ts,
        e.quantity.unwrap_or(Quantity::Volume),
        e.value,
        &p.actor(),
        &e.reason,
    )
    .await
    .map_err(|err| match err {
        pipeline::edit::EditError::NotFound { .. } => {
            ApiError::NotFound("no read of that meter at that time".into())
        }
        other => ApiError::Internal(format!("edit: {other:?}")),
    })?;
    Ok(axum::Json(ReadEdited {
        old_value: out.old_value.normalize(),
        old_quality: out.old_quality,
    }))
}
