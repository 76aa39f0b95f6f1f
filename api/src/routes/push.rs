//! IF-METER-004 (push of reads and raw frames by external systems, signed) and IF-REV-004
//! (manual and mobile reads): both become readings published onto the meters' partition
//! topics, so the worker that owns a meter validates them with its own state.

use std::collections::HashMap;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use model::{ClockSource, MeterId, Provenance, Quality, Quantity, Reading, SourceKind, Unit};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::{Principal, Scope};
use crate::calllog::CallCtx;
use crate::error::{ApiError, Problem};
use crate::extract::{ApiJson, Auth};
use crate::rbac;
use crate::routes::scope_sql;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(push))
        .routes(routes!(manual_reads))
}

/// One read as an IoT platform or concentrator reports it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushRead {
    /// Meter id (`cjt188:…`, `mbus:…`, or a configured name).
    pub meter: String,
    /// Measurement time, RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    /// Quantity (default `volume`).
    #[schema(value_type = Option<String>, example = "volume")]
    #[serde(default)]
    pub quantity: Option<Quantity>,
    /// Value, a decimal string.
    #[schema(value_type = String, example = "1234.567")]
    pub value: Decimal,
    /// Unit (`m3`, `L`, ...).
    #[schema(value_type = String, example = "m3")]
    pub unit: Unit,
    /// Tariff register (default 0).
    #[serde(default)]
    pub tariff: u16,
    /// Sub-unit (default 0).
    #[serde(default)]
    pub subunit: u16,
    /// Storage number (default 0, the current value).
    #[serde(default)]
    pub storage: u32,
}

/// One raw frame (CJ/T 188 or wired M-Bus), hex.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushFrame {
    /// The frame bytes as hex (spaces allowed).
    pub hex: String,
    /// `cjt188` or `mbus`; detected from the bytes when absent.
    #[serde(default)]
    pub protocol: Option<String>,
    /// When the platform received it (RFC 3339); the read's timestamp. Default: now.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub received_at: Option<OffsetDateTime>,
}

/// A push: reads and frames, at most 5000 items together (a single read is a list of one).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// Decoded reads.
    #[serde(default)]
    pub reads: Vec<PushRead>,
    /// Raw frames decoded here.
    #[serde(default)]
    pub frames: Vec<PushFrame>,
}

/// What was accepted: published to the broker and acknowledged by it (durable).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PushAccepted {
    /// Items (reads + frames) accepted.
    pub items: usize,
    /// Readings published (a frame may carry several).
    pub readings: usize,
    /// Partition batches published.
    pub batches: usize,
}

/// IF-METER-004 集抄数据接收: push of reads or raw frames by a signed external client.
///
/// Accepted (202) means durable: every reading was published at QoS 1 on its partition topic
/// and acknowledged by the broker; the pipeline worker owning the meter validates and stores
/// it (deduplicated). All or nothing: one bad item refuses the request. With an
/// `Idempotency-Key`, a retried request gets the first answer.
#[utoipa::path(post, path = "/api/v1/push", tag = "IF-METER-004",
    request_body = PushRequest,
    params(
        ("X-Client-Id" = String, Header, description = "signing client"),
        ("X-Timestamp" = i64, Header, description = "unix seconds, within ±5 min"),
        ("X-Nonce" = String, Header, description = "16..64 of [A-Za-z0-9_-], never reused"),
        ("X-Signature" = String, Header, description = "hex HMAC-SHA256 of the canonical request"),
        ("Idempotency-Key" = Option<String>, Header, description = "1..128 printable characters"),
    ),
    security(("signed" = [])),
    responses(
        (status = 202, body = PushAccepted),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, body = Problem), (status = 413, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem),
    ))]
async fn push(
    State(s): State<AppState>,
    Extension(ctx): Extension<CallCtx>,
    req: Request,
) -> Result<Response, ApiError> {
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string());
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, s.config.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::TooLarge(format!(
                "request body is larger than {} bytes",
                s.config.max_body_bytes
            ))
        })?;
    ctx.set_body(&parts.method, &parts.uri, &body);
    let principal = match crate::signing::verify(
        &s.pool,
        &parts.method,
        parts.uri.path(),
        &parts.headers,
        &body,
        s.config.max_skew_s,
    )
    .await
    {
        Ok(p) => p,
        Err(f) => {
            ctx.set_caller(&f.client);
            let addr = peer
                .as_deref()
                .map_or("-", |p| p.rsplit_once(':').map_or(p, |x| x.0));
            s.metrics
                .auth_failure(&f.client, addr, f.error.error_code());
            return Err(f.error);
        }
    };
    ctx.set_caller(&principal.subject);
    let key = match parts.headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| (1..=128).contains(&k.len()))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "Idempotency-Key must be 1..128 printable ASCII characters",
                    )
                })?;
            Some(k.to_owned())
        }
    };
    let body_hash = hex::encode(Sha256::digest(&body));
    if let Some(k) = &key
        && let Some(previous) = claim_key(&s, &principal.subject, k, &body_hash).await?
    {
        return Ok(previous);
    }
    let result = accept_push(&s, &principal, &body, peer).await;
    if let Some(k) = &key {
        match &result {
            Ok(answer) => store_answer(&s, &principal.subject, k, answer).await?,
            // A refused or failed request may be retried under the same key.
            Err(_) => release_key(&s, &principal.subject, k).await,
        }
    }
    let answer = result?;
    Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response())
}

async fn accept_push(
    s: &AppState,
    principal: &Principal,
    body: &[u8],
    peer: Option<String>,
) -> Result<PushAccepted, ApiError> {
    let request: PushRequest = serde_json::from_slice(body).map_err(|e| ApiError::Invalid {
        field: None,
        detail: format!("body is not a push request: {e}"),
        status: if e.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        },
    })?;
    let items = request.reads.len() + request.frames.len();
    if items == 0 {
        return Err(ApiError::field(
            "reads",
            "nothing to push: give reads or frames",
        ));
    }
    if items > s.config.max_batch {
        return Err(ApiError::TooLarge(format!(
            "{items} reads and frames in one request; at most {}",
            s.config.max_batch
        )));
    }
    let now = OffsetDateTime::now_utc();
    let gateway = s.publisher.gateway().clone();
    let mut readings = Vec::with_capacity(items);
    for (i, r) in request.reads.iter().enumerate() {
        let meter = MeterId::new(r.meter.clone())
            .map_err(|e| ApiError::field(format!("reads[{i}].meter"), e.to_string()))?;
        if r.ts > now + time::Duration::minutes(10) {
            return Err(ApiError::field(
                format!("reads[{i}].ts"),
                "is in the future",
            ));
        }
        let mut h = Sha256::new();
        h.update(format!(
            "{}|{}|{}|{}|{}|{}|{}",
            r.meter,
            r.ts.unix_timestamp_nanos(),
            r.value,
            r.unit.symbol(),
            r.tariff,
            r.subunit,
            r.storage
        ));
        readings.push(Reading {
            meter,
            ts: r.ts,
            clock: ClockSource::Platform,
            quantity: r.quantity.unwrap_or(Quantity::Volume),
            value: r.value,
            unit: r.unit,
            storage: r.storage,
            tariff: r.tariff,
            subunit: r.subunit,
            quality: Quality::Actual,
            flags: Vec::new(),
            provenance: Provenance {
                gateway: gateway.clone(),
                source: SourceKind::HttpPush,
                source_id: principal.subject.clone(),
                frame_hash: hex::encode(h.finalize()),
                received_at: now,
                channel: peer.clone(),
            },
        });
    }
    for (i, f) in request.frames.iter().enumerate() {
        let field = format!("frames[{i}]");
        let decoded = decode_frame(f, &field)?;
        let ts = f.received_at.unwrap_or(now);
        let clock = if f.received_at.is_some() {
            ClockSource::Platform
        } else {
            ClockSource::Gateway
        };
        let before = readings.len();
        let (meter, frame, raw) = decoded;
        for record in frame
            .records
            .iter()
            .filter(|r| r.function == decoders::Function::Instantaneous)
        {
            let (Some(quantity), decoders::RecordValue::Number(value)) =
                (record.reading_quantity(), &record.value)
            else {
                continue;
            };
            readings.push(Reading {
                meter: meter.clone(),
                ts,
                clock,
                quantity,
                value: *value,
                unit: record.unit.unwrap_or(Unit::Dimensionless),
                storage: record.storage,
                tariff: record.tariff,
                subunit: record.subunit,
                quality: Quality::Actual,
                flags: Vec::new(),
                provenance: Provenance {
                    gateway: gateway.clone(),
                    source: SourceKind::HttpPush,
                    source_id: principal.subject.clone(),
                    frame_hash: hex::encode(Sha256::digest(&raw)),
                    received_at: now,
                    channel: peer.clone(),
                },
            });
        }
        if readings.len() == before {
            return Err(ApiError::field(
                field,
                "the frame decodes but carries no reading",
            ));
        }
    }
    check_scope(
        s,
        &principal.scope,
        readings.iter().map(|r| r.meter.as_str()),
        "reads",
    )
    .await?;
    let published = s.publisher.publish(readings).await?;
    s.metrics.add(
        "api_push_readings_accepted_total",
        published.readings as u64,
    );
    Ok(PushAccepted {
        items,
        readings: published.readings,
        batches: published.batches,
    })
}

fn decode_frame(
    f: &PushFrame,
    field: &str,
) -> Result<(MeterId, decoders::DecodedFrame, Vec<u8>), ApiError> {
    let compact: String = f.hex.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let raw = hex::decode(&compact)
        .map_err(|e| ApiError::field(format!("{field}.hex"), format!("not hex: {e}")))?;
    let protocol = match f.protocol.as_deref() {
        None => decoders::detect(&raw).ok_or_else(|| {
            ApiError::field(
                format!("{field}.hex"),
                "neither a CJ/T 188 nor an M-Bus frame",
            )
        })?,
        Some("cjt188") => decoders::Protocol::Cjt188,
        Some("mbus") => decoders::Protocol::Mbus,
        Some(other) => {
            return Err(ApiError::field(
                format!("{field}.protocol"),
                format!("{other:?} is not cjt188 or mbus"),
            ));
        }
    };
    let frame = match decoders::decode(protocol, &raw) {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => {
            return Err(ApiError::field(
                format!("{field}.hex"),
                format!("cannot decode: {e}"),
            ));
        }
        None => {
            return Err(ApiError::field(
                format!("{field}.protocol"),
                "only cjt188 and mbus frames are decoded here",
            ));
        }
    };
    let id = match frame.protocol {
        decoders::Protocol::Cjt188 => format!("cjt188:{}", frame.meter.id),
        _ => format!(
            "mbus:{}{}",
            frame.meter.manufacturer.as_deref().unwrap_or(""),
            frame.meter.id
        ),
    };
    let meter = MeterId::new(id)
        .map_err(|e| ApiError::field(format!("{field}.hex"), format!("meter id: {e}")))?;
    Ok((meter, frame, raw))
}

/// Refuses meters outside a scoped caller's organisation (registered elsewhere or not at all).
async fn check_scope<'a>(
    s: &AppState,
    scope: &Scope,
    meters: impl Iterator<Item = &'a str>,
    what: &str,
) -> Result<(), ApiError> {
    if scope.org.is_none() {
        return Ok(());
    }
    let mut ids: Vec<&str> = meters.collect();
    ids.sort_unstable();
    ids.dedup();
    let inside: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT m.meter_id FROM meters m WHERE m.meter_id = ANY($1) AND {}",
        scope_sql(2, 3)
    ))
    .bind(&ids)
    .bind(&scope.org)
    .bind(scope.areas_param())
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("checking the data scope"))?;
    if inside.len() == ids.len() {
        return Ok(());
    }
    let inside: std::collections::HashSet<String> = inside.into_iter().map(|r| r.0).collect();
    let outside = ids
        .iter()
        .find(|m| !inside.contains(**m))
        .copied()
        .unwrap_or("");
    Err(ApiError::Forbidden(format!(
        "{what}: meter {outside:?} is not registered in your organisation"
    )))
}

async fn claim_key(
    s: &AppState,
    client: &str,
    key: &str,
    body_hash: &str,
) -> Result<Option<Response>, ApiError> {
    let inserted = sqlx::query(
        "INSERT INTO api_idempotency (client_id, key, request_hash) VALUES ($1, $2, $3)
         ON CONFLICT (client_id, key) DO NOTHING",
    )
    .bind(client)
    .bind(key)
    .bind(body_hash)
    .execute(&s.pool)
    .await
    .map_err(ApiError::db("claiming an idempotency key"))?;
    if inserted.rows_affected() == 1 {
        return Ok(None);
    }
    let row: Option<(String, Option<i16>, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT request_hash, status, body FROM api_idempotency WHERE client_id = $1 AND key = $2",
    )
    .bind(client)
    .bind(key)
    .fetch_optional(&s.pool)
    .await
    .map_err(ApiError::db("reading an idempotency key"))?;
    match row {
        Some((hash, _, _)) if hash != body_hash => Err(ApiError::field(
            "Idempotency-Key",
            "was used before with a different body",
        )),
        Some((_, Some(status), Some(body))) => {
            let status = StatusCode::from_u16(u16::try_from(status).unwrap_or(500))
                .unwrap_or(StatusCode::ACCEPTED);
            let mut r = (status, axum::Json(body)).into_response();
            r.headers_mut().insert(
                "idempotent-replay",
                axum::http::HeaderValue::from_static("true"),
            );
            Ok(Some(r))
        }
        Some(_) => Err(ApiError::Conflict(
            "a request with this Idempotency-Key is still in progress".into(),
        )),
        // Released between the insert and the read: the caller may retry.
        None => Err(ApiError::Conflict("retry the request".into())),
    }
}

async fn store_answer(
    s: &AppState,
    client: &str,
    key: &str,
    answer: &PushAccepted,
) -> Result<(), ApiError> {
    let body = serde_json::to_value(answer).unwrap_or_default();
    sqlx::query(
        "UPDATE api_idempotency SET status = 202, body = $3 WHERE client_id = $1 AND key = $2",
    )
    .bind(client)
    .bind(key)
    .bind(body)
    .execute(&s.pool)
    .await
    .map_err(ApiError::db("storing an idempotent answer"))?;
    Ok(())
}

async fn release_key(s: &AppState, client: &str, key: &str) {
    if let Err(e) = sqlx::query("DELETE FROM api_idempotency WHERE client_id = $1 AND key = $2")
        .bind(client)
        .bind(key)
        .execute(&s.pool)
        .await
    {
        tracing::warn!(error = %e, "releasing an idempotency key failed");
    }
}

/// One manual or mobile read.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManualRead {
    /// Meter number or meter id.
    pub meter: String,
    /// When the register was read, RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    /// Register value, a decimal string.
    #[schema(value_type = String, example = "123.4")]
    pub value: Decimal,
    /// Unit (default `m3`).
    #[schema(value_type = Option<String>, example = "m3")]
    #[serde(default)]
    pub unit: Option<Unit>,
    /// Reference of the photo of the register (object-store key), kept with the read.
    #[serde(default)]
    pub photo_ref: Option<String>,
}

/// A batch of manual reads (at most 5000).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManualReads {
    /// The reads.
    pub reads: Vec<ManualRead>,
    /// Reader's device or badge id, recorded with the caller's identity.
    #[serde(default)]
    pub device: Option<String>,
}

/// IF-REV-004 抄表数据提交: manual and mobile reads, validated by VEE in the worker that owns
/// each meter (published onto its partition topic like any read), so the worker's state and
/// the stored read never disagree. 202 once the broker has them.
#[utoipa::path(post, path = "/api/v1/manual-reads", tag = "IF-REV-004",
    request_body = ManualReads,
    security(("bearer" = [])),
    responses((status = 202, body = PushAccepted), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 413, body = Problem),
        (status = 422, body = Problem), (status = 503, body = Problem)))]
async fn manual_reads(
    State(s): State<AppState>,
    Auth(p): Auth,
    ApiJson(req): ApiJson<ManualReads>,
) -> Result<(StatusCode, axum::Json<PushAccepted>), ApiError> {
    p.require(rbac::MANUAL_READS)?;
    if req.reads.is_empty() {
        return Err(ApiError::field("reads", "no reads"));
    }
    if req.reads.len() > s.config.max_batch {
        return Err(ApiError::TooLarge(format!(
            "{} reads in one request; at most {}",
            req.reads.len(),
            s.config.max_batch
        )));
    }
    if let Some(d) = &req.device
        && (d.is_empty() || d.len() > 64)
    {
        return Err(ApiError::field("device", "1..64 characters"));
    }
    let keys: Vec<&str> = req.reads.iter().map(|r| r.meter.as_str()).collect();
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(&format!(
        "SELECT m.meter_id, m.meter_no FROM meters m
         WHERE (m.meter_id = ANY($1) OR m.meter_no = ANY($1)) AND {}",
        scope_sql(2, 3)
    ))
    .bind(&keys)
    .bind(&p.scope.org)
    .bind(p.scope.areas_param())
    .fetch_all(&s.pool)
    .await
    .map_err(ApiError::db("resolving meters"))?;
    let mut ids: HashMap<String, String> = HashMap::new();
    for (id, no) in rows {
        if let Some(no) = no {
            ids.insert(no, id.clone());
        }
        ids.insert(id.clone(), id);
    }
    let now = OffsetDateTime::now_utc();
    let reader = match &req.device {
        Some(d) => format!("reader:{}@{d}", p.subject),
        None => format!("reader:{}", p.subject),
    };
    let mut readings = Vec::with_capacity(req.reads.len());
    for (i, r) in req.reads.iter().enumerate() {
        let id = ids.get(&r.meter).ok_or_else(|| {
            ApiError::field(
                format!("reads[{i}].meter"),
                format!("no meter {:?} in your scope", r.meter),
            )
        })?;
        let meter = MeterId::new(id.clone())
            .map_err(|e| ApiError::field(format!("reads[{i}].meter"), e.to_string()))?;
        if r.ts > now + time::Duration::minutes(10) {
            return Err(ApiError::field(
                format!("reads[{i}].ts"),
                "is in the future",
            ));
        }
        if r.value.is_sign_negative() {
            return Err(ApiError::field(
                format!("reads[{i}].value"),
                "must not be negative",
            ));
        }
        if let Some(photo) = &r.photo_ref
            && (photo.is_empty() || photo.len() > 256 || photo.chars().any(char::is_control))
        {
            return Err(ApiError::field(
                format!("reads[{i}].photo_ref"),
                "1..256 printable characters",
            ));
        }
        let mut h = Sha256::new();
        h.update(format!(
            "manual|{id}|{}|{}|{reader}",
            r.ts.unix_timestamp_nanos(),
            r.value
        ));
        readings.push(Reading {
            meter,
            ts: r.ts,
            clock: ClockSource::Manual,
            quantity: Quantity::Volume,
            value: r.value,
            unit: r.unit.unwrap_or(Unit::CubicMetre),
            storage: 0,
            tariff: 0,
            subunit: 0,
            quality: Quality::Actual,
            flags: Vec::new(),
            provenance: Provenance {
                gateway: s.publisher.gateway().clone(),
                source: SourceKind::Api,
                source_id: reader.clone(),
                frame_hash: hex::encode(h.finalize()),
                received_at: now,
                // The photo reference travels as the read's channel: where it came from.
                channel: r.photo_ref.as_ref().map(|ph| format!("photo:{ph}")),
            },
        });
    }
    let published = s.publisher.publish(readings).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(PushAccepted {
            items: req.reads.len(),
            readings: published.readings,
            batches: published.batches,
        }),
    ))
}
