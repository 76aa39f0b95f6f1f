//! Device sets from the central registry (METER-003): with `[registry] device_sets = true` the
//! gateway subscribes to its retained `{root}/{gateway}/config/devices` on its own connection
//! (`{base}-cfg`), hands each newer version to the runtime, which checks it exactly like the
//! TOML's `[[device]]` tables and applies it without a restart
//! ([`crate::runtime::Gateway::apply_device_set`]), and reports the outcome, retained, on
//! `{root}/{gateway}/status/device-set` ([`model::DeviceSetReport`]).
//!
//! A set older than the one in force, for another gateway, unreadable, or failing the checks
//! is refused and reported; the set in force stays. The applied set is kept in
//! `{spool dir}/device-set.json`, so a restart without the broker starts with it.
//! Keys never travel in a set: devices name them (`key_ref`) in the local key file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use model::{DEVICE_SET_WIRE_VERSION, DeviceSet, DeviceSetReport, GatewayId};
use rumqttc::{Event, Packet, QoS};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::mqtt::{self, MqttEndpoint};

/// A set for the runtime to check and apply; it answers with the number of devices in force
/// or why it refused.
#[derive(Debug)]
pub struct DeviceSetUpdate {
    /// The set.
    pub set: DeviceSet,
    /// Where the runtime answers.
    pub reply: oneshot::Sender<Result<usize, String>>,
}

/// Settings of the device-set connection.
#[derive(Debug, Clone)]
pub struct DeviceSetOptions {
    /// Broker.
    pub endpoint: MqttEndpoint,
    /// MQTT client id (`{base}-cfg`).
    pub client_id: String,
    /// Topic root.
    pub topic_root: String,
    /// This gateway.
    pub gateway: GatewayId,
    /// Where the applied set is kept.
    pub state_file: PathBuf,
}

/// The file the applied set is kept in, under the spool directory.
pub fn state_file(spool_dir: &Path) -> PathBuf {
    spool_dir.join("device-set.json")
}

/// Reads the kept set, if any (an unreadable file is logged and ignored: the retained set on
/// the broker replaces it).
pub fn load_state(path: &Path) -> Option<DeviceSet> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(set) => Some(set),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable kept device set");
            None
        }
    }
}

/// Writes the applied set (temporary file, fsync, rename), so a crash leaves the old or the
/// new file, never half of one.
fn save_state(path: &Path, set: &DeviceSet) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(set).unwrap_or_default())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn report(
    gateway: &GatewayId,
    applied: u64,
    devices: usize,
    refused: Option<(u64, String)>,
) -> Vec<u8> {
    let (refused_version, error) = match refused {
        Some((v, e)) => (Some(v), Some(e)),
        None => (None, None),
    };
    serde_json::to_vec(&DeviceSetReport {
        v: DEVICE_SET_WIRE_VERSION,
        gateway: gateway.to_string(),
        applied_version: applied,
        devices,
        refused_version,
        error,
        at: OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default(),
    })
    .unwrap_or_default()
}

/// What to do with a received set, given the version in force.
fn judge(set: &DeviceSet, gateway: &GatewayId, applied: u64) -> Result<bool, String> {
    if set.gateway != gateway.as_str() {
        return Err(format!(
            "the set is for gateway `{}`, this is `{gateway}`",
            set.gateway
        ));
    }
    if set.version < applied {
        return Err(format!(
            "version {} is older than version {applied} in force",
            set.version
        ));
    }
    // The same version again is the retained copy after a reconnect: nothing to do.
    Ok(set.version > applied)
}

/// Runs the device-set connection until `shutdown`. `applied` and `devices` describe the set
/// in force at start (0 and the TOML's count when none).
pub async fn run(
    opts: DeviceSetOptions,
    mut applied: u64,
    mut devices: usize,
    updates: mpsc::Sender<DeviceSetUpdate>,
    shutdown: CancellationToken,
) {
    let topic = model::topic::device_set(&opts.topic_root, opts.gateway.as_str());
    let report_topic = model::topic::device_set_report(&opts.topic_root, opts.gateway.as_str());
    let mut backoff = Duration::from_millis(200);
    let mut last_refusal: Option<(u64, String)> = None;
    loop {
        let mut options = opts.endpoint.options(&opts.client_id, None);
        options.set_clean_session(true);
        options.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut events) = mqtt::connect(options, 64);
        let failure = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    client.disconnect().await.ok();
                    return;
                }
                ev = events.recv() => match ev {
                    None => break "event loop ended".to_owned(),
                    Some(Err(e)) => break e.to_string(),
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        backoff = Duration::from_millis(200);
                        client.subscribe(&topic, QoS::AtLeastOnce).await.ok();
                        client.publish(&report_topic, QoS::AtLeastOnce, true,
                            report(&opts.gateway, applied, devices, last_refusal.clone())).await.ok();
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let outcome = match serde_json::from_slice::<DeviceSet>(&p.payload) {
                            Err(e) => Err((0, format!("unreadable device set: {e}"))),
                            Ok(set) => {
                                let version = set.version;
                                match judge(&set, &opts.gateway, applied) {
                                    Err(e) => Err((version, e)),
                                    Ok(false) => Ok(None),
                                    Ok(true) => {
                                        let (reply, answer) = oneshot::channel();
                                        let kept = set.clone();
                                        if updates.send(DeviceSetUpdate { set, reply }).await.is_err() {
                                            return;
                                        }
                                        match answer.await {
                                            Ok(Ok(n)) => Ok(Some((kept, n))),
                                            Ok(Err(e)) => Err((version, e)),
                                            Err(_) => return,
                                        }
                                    }
                                }
                            }
                        };
                        match outcome {
                            Ok(None) => continue,
                            Ok(Some((set, n))) => {
                                if let Err(e) = save_state(&opts.state_file, &set) {
                                    tracing::warn!(error = %e, file = %opts.state_file.display(), "cannot keep the device set on disk");
                                }
                                tracing::info!(version = set.version, devices = n, "device set applied");
                                applied = set.version;
                                devices = n;
                                last_refusal = None;
                            }
                            Err((version, e)) => {
                                tracing::error!(version, error = %e, "device set refused; the set in force stays");
                                last_refusal = Some((version, e));
                            }
                        }
                        client.publish(&report_topic, QoS::AtLeastOnce, true,
                            report(&opts.gateway, applied, devices, last_refusal.clone())).await.ok();
                    }
                    Some(Ok(_)) => {}
                },
            }
        };
        tracing::warn!(error = %failure, "device-set connection lost");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(gateway: &str, version: u64) -> DeviceSet {
        DeviceSet {
            v: DEVICE_SET_WIRE_VERSION,
            gateway: gateway.into(),
            version,
            published_at: String::new(),
            devices: vec![],
        }
    }

    #[test]
    fn versions_are_judged() {
        let gw = GatewayId::new("gw-1").expect("id");
        assert_eq!(judge(&set("gw-1", 3), &gw, 2), Ok(true));
        assert_eq!(judge(&set("gw-1", 2), &gw, 2), Ok(false));
        assert!(judge(&set("gw-1", 1), &gw, 2).is_err());
        assert!(judge(&set("gw-2", 9), &gw, 2).is_err());
    }
}
