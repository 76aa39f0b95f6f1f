//! Registry ↔ gateways (METER-003).
//!
//! - Registry → gateways: [`publish_device_sets`] builds each gateway's device set from the
//!   mounted meters it serves and publishes it retained (QoS 1) on
//!   `{root}/{gateway}/config/devices` with a version that grows whenever the set changes.
//!   Key references only, never keys (docs/registry.md).
//! - Gateways → registry: [`run`] keeps `gateways` up to date from the gateways' retained
//!   status (online/offline, firmware, last seen) and device-set reports, and republishes
//!   device sets when the registry changes (`LISTEN wm_registry`).
//! - Last frame per meter: the ingest worker hands the meters, gateways and receive times of
//!   each batch to a [`FrameSink`]; a task writes them behind to `meter_last_frame` every few
//!   seconds and reports a meter heard through a gateway other than the one registered.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use model::{DEVICE_SET_WIRE_VERSION, DeviceEntry, DeviceSet, DeviceSetReport};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use sqlx::{PgPool, Row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, watch};

use super::{RegistryError, db};

/// Why publishing or syncing failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The registry could not be read or written.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The broker URL is unusable.
    #[error("bad MQTT URL: {0}")]
    Url(String),
    /// The broker did not take the messages in time.
    #[error("MQTT: {0}")]
    Mqtt(String),
}

/// Topic of a gateway's device set.
pub fn device_set_topic(root: &str, gateway: &str) -> String {
    model::topic::device_set(root, gateway)
}

/// Topic of a gateway's device-set report.
pub fn report_topic(root: &str, gateway: &str) -> String {
    model::topic::device_set_report(root, gateway)
}

/// FNV-1a 64 of the set's JSON: a stable content hash (the version moves only when it does).
fn content_hash(devices: &[DeviceEntry]) -> String {
    let json = serde_json::to_string(devices).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in json.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The devices of every gateway named by mounted meters (installed, active, faulty) that have
/// a gateway source, sorted by id; gateways known to the registry without such meters get an
/// empty set.
///
/// # Errors
/// [`RegistryError::Db`] when the query fails.
pub async fn device_sets(
    pool: &PgPool,
) -> Result<BTreeMap<String, Vec<DeviceEntry>>, RegistryError> {
    let rows = sqlx::query(
        "SELECT gateway_id, meter_id, meter_no, protocol, gateway_source, gateway_address,
                register_map, key_ref
         FROM meters
         WHERE gateway_id IS NOT NULL AND gateway_source IS NOT NULL
           AND status IN ('installed', 'active', 'faulty')
         ORDER BY gateway_id, meter_id",
    )
    .fetch_all(pool)
    .await
    .map_err(db("reading the device sets"))?;
    let mut sets: BTreeMap<String, Vec<DeviceEntry>> = BTreeMap::new();
    let known: Vec<String> = sqlx::query_scalar("SELECT gateway_id FROM gateways")
        .fetch_all(pool)
        .await
        .map_err(db("reading the gateways"))?;
    for g in known {
        sets.entry(g).or_default();
    }
    for r in rows {
        let get = |i: usize| -> Result<Option<String>, RegistryError> {
            r.try_get(i).map_err(db("reading a device"))
        };
        let gateway = get(0)?.unwrap_or_default();
        let protocol = get(3)?.unwrap_or_default();
        // The gateway's device protocols; `named` meters are Modbus instruments by name.
        let protocol = if protocol == "named" {
            "modbus".to_owned()
        } else {
            protocol
        };
        sets.entry(gateway).or_default().push(DeviceEntry {
            id: get(1)?.unwrap_or_default(),
            meter_no: get(2)?,
            protocol,
            source: get(4)?.unwrap_or_default(),
            address: get(5)?,
            register_map: get(6)?,
            key_ref: get(7)?,
        });
    }
    Ok(sets)
}

/// A published device set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Gateway.
    pub gateway: String,
    /// Version published.
    pub version: u64,
    /// Devices in it.
    pub devices: usize,
}

/// Publishes the device set of every gateway whose set changed since it was last published
/// (all of them with `force`), retained at QoS 1, each with its next version. Versions are
/// committed only after the broker acknowledged every message, so a failed publish is retried
/// by the next call with the same content.
///
/// # Errors
/// [`SyncError`] when the registry or the broker fails (no version is then consumed).
pub async fn publish_device_sets(
    pool: &PgPool,
    broker_url: &str,
    client_id: &str,
    root: &str,
    force: bool,
) -> Result<Vec<Published>, SyncError> {
    let sets = device_sets(pool).await?;
    let mut tx = pool.begin().await.map_err(db("beginning"))?;
    let mut messages = Vec::new();
    let mut published = Vec::new();
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    for (gateway, devices) in sets {
        let hash = content_hash(&devices);
        sqlx::query("INSERT INTO gateways (gateway_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(&gateway)
            .execute(&mut *tx)
            .await
            .map_err(db("registering the gateway"))?;
        let version: Option<i64> = sqlx::query_scalar(
            "UPDATE gateways SET
                 device_set_version = device_set_version
                     + CASE WHEN device_set_hash IS DISTINCT FROM $2 THEN 1 ELSE 0 END,
                 device_set_hash = $2, updated_at = now()
             WHERE gateway_id = $1 AND ($3 OR device_set_hash IS DISTINCT FROM $2)
             RETURNING device_set_version",
        )
        .bind(&gateway)
        .bind(&hash)
        .bind(force)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("versioning the device set"))?;
        let Some(version) = version else { continue };
        let version = u64::try_from(version).unwrap_or(0);
        let set = DeviceSet {
            v: DEVICE_SET_WIRE_VERSION,
            gateway: gateway.clone(),
            version,
            published_at: now.clone(),
            devices,
        };
        published.push(Published {
            gateway: gateway.clone(),
            version,
            devices: set.devices.len(),
        });
        messages.push((
            device_set_topic(root, &gateway),
            serde_json::to_vec(&set).unwrap_or_default(),
        ));
    }
    if !messages.is_empty() {
        publish_retained(broker_url, client_id, messages).await?;
    }
    tx.commit().await.map_err(db("committing the versions"))?;
    for p in &published {
        tracing::info!(gateway = %p.gateway, version = p.version, devices = p.devices, "device set published");
    }
    Ok(published)
}

fn mqtt_client(
    broker_url: &str,
    client_id: &str,
    cap: usize,
    clean_session: bool,
) -> Result<(AsyncClient, rumqttc::EventLoop), SyncError> {
    let url = |e: crate::config::UrlError| SyncError::Url(e.to_string());
    let broker = crate::config::broker_url(broker_url).map_err(url)?;
    crate::config::mqtt_client(&broker, client_id, cap, |o| {
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(16 << 20, 16 << 20)
            .set_clean_session(clean_session);
    })
    .map_err(url)
}

/// Publishes `messages` retained at QoS 1 on a short-lived connection and waits (10 s at most)
/// until the broker acknowledged each.
///
/// # Errors
/// [`SyncError::Mqtt`] when the broker cannot be reached or does not acknowledge in time.
pub async fn publish_retained(
    broker_url: &str,
    client_id: &str,
    messages: Vec<(String, Vec<u8>)>,
) -> Result<(), SyncError> {
    let (client, mut events) = mqtt_client(broker_url, client_id, 64, true)?;
    let n = messages.len();
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        let mut acked = 0;
        let mut queued = false;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) if !queued => {
                    queued = true;
                    for (topic, body) in &messages {
                        client
                            .publish(topic.as_str(), QoS::AtLeastOnce, true, body.clone())
                            .await
                            .map_err(|e| SyncError::Mqtt(e.to_string()))?;
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == n {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(SyncError::Mqtt(e.to_string())),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(SyncError::Mqtt("no acknowledgement within 10 s".into())));
    client.disconnect().await.ok();
    tokio::time::timeout(Duration::from_millis(200), events.poll())
        .await
        .ok();
    result
}

/// Records a gateway's retained status (`{"state": "online"|"offline", "version": firmware,
/// "at": …, "health": {"spool_depth": …, "uplink_lag_s": …, …}}`) or device-set report in
/// `gateways`; a status with health also sets `spool_depth`, `uplink_lag_s` and `health_at`
/// (the status's `at`), a status without keeps the last health. Returns false for a payload it does not
/// understand (logged, not an error: any client can publish there).
///
/// # Errors
/// [`RegistryError::Db`] when the update fails.
pub async fn record_gateway_message(
    pool: &PgPool,
    root: &str,
    topic: &str,
    payload: &[u8],
) -> Result<bool, RegistryError> {
    let Some(rest) = topic.strip_prefix(root).and_then(|t| t.strip_prefix('/')) else {
        return Ok(false);
    };
    let (gateway, kind) = match rest.split_once('/') {
        Some((g, "status")) => (g, "status"),
        Some((g, "status/device-set")) => (g, "report"),
        _ => return Ok(false),
    };
    if kind == "report" {
        let Ok(report) = serde_json::from_slice::<DeviceSetReport>(payload) else {
            tracing::warn!(%topic, "unreadable device-set report");
            return Ok(false);
        };
        sqlx::query(
            "INSERT INTO gateways (gateway_id, device_set_applied, device_set_error, last_seen)
             VALUES ($1, $2, $3, now())
             ON CONFLICT (gateway_id) DO UPDATE SET device_set_applied = excluded.device_set_applied,
                 device_set_error = excluded.device_set_error, last_seen = now(), updated_at = now()",
        )
        .bind(gateway)
        .bind(i64::try_from(report.applied_version).unwrap_or(i64::MAX))
        .bind(report.error.as_ref().map(|e| {
            format!("version {}: {e}", report.refused_version.unwrap_or(0))
        }))
        .execute(pool)
        .await
        .map_err(db("recording a device-set report"))?;
        if let Some(e) = &report.error {
            tracing::warn!(%gateway, refused = report.refused_version, error = %e, "gateway refused a device set");
        }
        return Ok(true);
    }
    let Ok(status) = serde_json::from_slice::<serde_json::Value>(payload) else {
        tracing::warn!(%topic, "unreadable gateway status");
        return Ok(false);
    };
    let online = match status.get("state").and_then(|s| s.as_str()) {
        Some("online") => true,
        Some("offline") => false,
        _ => return Ok(false),
    };
    let firmware = status.get("version").and_then(|v| v.as_str());
    let at = status
        .get("at")
        .and_then(|v| v.as_str())
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok());
    let health = status.get("health").filter(|h| h.is_object());
    let spool_depth = health
        .and_then(|h| h.get("spool_depth"))
        .and_then(serde_json::Value::as_u64)
        .map(|d| i64::try_from(d).unwrap_or(i64::MAX));
    let uplink_lag_s = health
        .and_then(|h| h.get("uplink_lag_s"))
        .and_then(serde_json::Value::as_f64);
    // A retained status is read again at every (re)connect of the sync service: health_at is
    // the gateway's own time of the status, so an old health never looks fresh.
    let health_at = health.map(|_| at.unwrap_or_else(OffsetDateTime::now_utc));
    sqlx::query(
        "INSERT INTO gateways (gateway_id, online, firmware, status, last_seen, spool_depth,
                               uplink_lag_s, health_at)
         VALUES ($1, $2, $3, $4, coalesce($5, now()), $6, $7, $8)
         ON CONFLICT (gateway_id) DO UPDATE SET online = excluded.online,
             firmware = coalesce(excluded.firmware, gateways.firmware), status = excluded.status,
             last_seen = greatest(gateways.last_seen, excluded.last_seen),
             spool_depth = CASE WHEN excluded.health_at IS NOT NULL THEN excluded.spool_depth
                                ELSE gateways.spool_depth END,
             uplink_lag_s = CASE WHEN excluded.health_at IS NOT NULL THEN excluded.uplink_lag_s
                                 ELSE gateways.uplink_lag_s END,
             health_at = coalesce(excluded.health_at, gateways.health_at), updated_at = now()",
    )
    .bind(gateway)
    .bind(online)
    .bind(firmware)
    .bind(&status)
    .bind(at)
    .bind(spool_depth)
    .bind(uplink_lag_s)
    .bind(health_at)
    .execute(pool)
    .await
    .map_err(db("recording a gateway status"))?;
    Ok(true)
}

/// Settings of the registry sync service.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Broker URL (`mqtt://host:port`).
    pub broker_url: String,
    /// Topic root.
    pub root: String,
    /// Client id base (`-sub` and `-pub` are appended).
    pub client_id: String,
    /// Longest time between two device-set checks without any notification.
    pub republish_every: Duration,
}

/// Runs the sync service until `shutdown`: records gateway statuses and reports, and
/// republishes device sets within about a second of a registry change (and every
/// `republish_every`).
///
/// # Errors
/// [`SyncError::Url`] for a bad broker URL; everything else is logged and retried.
pub async fn run(
    pool: PgPool,
    opts: SyncOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SyncError> {
    let (client, mut events) = mqtt_client(
        &opts.broker_url,
        &format!("{}-sub", opts.client_id),
        256,
        true,
    )?;
    let mut changes = super::live::spawn_listener(pool.clone());
    let mut tick = tokio::time::interval(opts.republish_every);
    let publish = || async {
        if let Err(e) = publish_device_sets(
            &pool,
            &opts.broker_url,
            &format!("{}-pub", opts.client_id),
            &opts.root,
            false,
        )
        .await
        {
            tracing::error!(error = %e, "publishing device sets failed; retrying on the next change or tick");
        }
    };
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() { break; }
            }
            _ = tick.tick() => publish().await,
            c = changes.recv() => {
                if c.is_none() { break; }
                // Let a burst (an import, a lifecycle operation's several statements) settle.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while changes.try_recv().is_ok() {}
                publish().await;
            }
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in ["status", "status/device-set"] {
                        client.subscribe(format!("{}/+/{f}", opts.root), QoS::AtLeastOnce).await.ok();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Err(e) = record_gateway_message(&pool, &opts.root, &p.topic, &p.payload).await {
                        tracing::error!(error = %e, "recording a gateway message failed");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "registry sync: MQTT connection failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    }
    client.disconnect().await.ok();
    Ok(())
}

/// One batch's last frame per meter: (meter id, gateway id, receive time).
type Frames = Vec<(String, String, OffsetDateTime)>;

/// Where an ingest worker reports which gateway each meter was last heard through; written
/// behind to `meter_last_frame` by the task [`FrameSink::spawn`] starts.
#[derive(Debug, Clone)]
pub struct FrameSink {
    tx: mpsc::UnboundedSender<Frames>,
}

impl FrameSink {
    /// Starts the writer task (flushes every `every`) and returns the sink.
    pub fn spawn(pool: PgPool, every: Duration) -> FrameSink {
        let (tx, mut rx) = mpsc::unbounded_channel::<Frames>();
        tokio::spawn(async move {
            let mut latest: HashMap<String, (String, OffsetDateTime)> = HashMap::new();
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    batch = rx.recv() => match batch {
                        Some(b) => merge(&mut latest, b),
                        None => {
                            write_frames(&pool, &mut latest).await;
                            return;
                        }
                    },
                    _ = tick.tick() => write_frames(&pool, &mut latest).await,
                }
            }
        });
        FrameSink { tx }
    }

    /// Notes the latest frame per meter of a batch of readings (one entry per meter).
    pub fn note(&self, readings: &[model::Reading]) {
        // foldhash: this runs per reading on the ingest path (SipHash showed in its profile).
        let mut by_meter: HashMap<&str, (&str, OffsetDateTime), foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(readings.len() / 2, Default::default());
        for r in readings {
            let e = by_meter
                .entry(r.meter.as_str())
                .or_insert((r.provenance.gateway.as_str(), r.provenance.received_at));
            if r.provenance.received_at > e.1 {
                *e = (r.provenance.gateway.as_str(), r.provenance.received_at);
            }
        }
        if by_meter.is_empty() {
            return;
        }
        let frames = by_meter
            .into_iter()
            .map(|(m, (g, t))| (m.to_owned(), g.to_owned(), t))
            .collect();
        self.tx.send(frames).ok();
    }
}

fn merge(latest: &mut HashMap<String, (String, OffsetDateTime)>, frames: Frames) {
    for (m, g, t) in frames {
        match latest.get_mut(&m) {
            Some(e) if e.1 >= t => {}
            Some(e) => *e = (g, t),
            None => {
                latest.insert(m, (g, t));
            }
        }
    }
}

/// Writes the pending last frames; on failure they stay pending for the next attempt.
async fn write_frames(pool: &PgPool, latest: &mut HashMap<String, (String, OffsetDateTime)>) {
    if latest.is_empty() {
        return;
    }
    let mut meters = Vec::with_capacity(latest.len());
    let mut gateways = Vec::with_capacity(latest.len());
    let mut times = Vec::with_capacity(latest.len());
    for (m, (g, t)) in latest.iter() {
        meters.push(m.as_str());
        gateways.push(g.as_str());
        times.push(*t);
    }
    // Only the unexpected rows come back: the others (every meter of the fleet, in a busy
    // interval) would be sent to this process just to be skipped.
    let result = sqlx::query(
        "WITH up AS (
             INSERT INTO meter_last_frame (meter_id, gateway_id, received_at, unexpected)
             SELECT s.meter_id, s.gateway_id, s.received_at,
                    coalesce(m.gateway_id IS NOT NULL AND m.gateway_id <> s.gateway_id, false)
             FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS s(meter_id, gateway_id, received_at)
             LEFT JOIN meters m ON m.meter_id = s.meter_id
             ORDER BY s.meter_id
             ON CONFLICT (meter_id) DO UPDATE SET gateway_id = excluded.gateway_id,
                 received_at = excluded.received_at, unexpected = excluded.unexpected,
                 updated_at = now()
             WHERE meter_last_frame.received_at <= excluded.received_at
             RETURNING meter_id, gateway_id, unexpected)
         SELECT meter_id, gateway_id, unexpected FROM up WHERE unexpected",
    )
    .bind(&meters)
    .bind(&gateways)
    .bind(&times)
    .fetch_all(pool)
    .await;
    match result {
        Ok(rows) => {
            for r in rows {
                if r.try_get::<bool, _>(2).unwrap_or(false) {
                    let m: String = r.try_get(0).unwrap_or_default();
                    let g: String = r.try_get(1).unwrap_or_default();
                    tracing::warn!(meter = %m, gateway = %g, "meter heard through a gateway the registry does not name for it");
                }
            }
            latest.clear();
        }
        Err(e) => {
            tracing::warn!(error = %e, pending = latest.len(), "writing last frames failed; retrying")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_moves_with_the_content_only() {
        let d = |id: &str| DeviceEntry {
            id: id.into(),
            meter_no: None,
            protocol: "wmbus".into(),
            source: "radio".into(),
            address: None,
            register_map: None,
            key_ref: Some("k1".into()),
        };
        assert_eq!(content_hash(&[d("a")]), content_hash(&[d("a")]));
        assert_ne!(content_hash(&[d("a")]), content_hash(&[d("b")]));
        assert_eq!(content_hash(&[d("a")]).len(), 16);
    }
}
