//! The registry's device set for one gateway (METER-003), published retained on
//! `{root}/{gateway}/config/devices`, and the gateway's report of what it did with it on
//! `{root}/{gateway}/status/device-set`.
//!
//! Keys never travel in a device set: a device names its key by reference (`key_ref`), a name
//! in the gateway's local key file (docs/registry.md).

use serde::{Deserialize, Serialize};

/// Version of the JSON form of [`DeviceSet`] and [`DeviceSetReport`].
pub const DEVICE_SET_WIRE_VERSION: u16 = 1;

/// Every device a gateway serves, as the registry sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSet {
    /// Wire version, [`DEVICE_SET_WIRE_VERSION`].
    pub v: u16,
    /// The gateway the set is for.
    pub gateway: String,
    /// Strictly increasing per gateway; a gateway refuses a version below the one it applied.
    pub version: u64,
    /// When the registry published it (RFC 3339).
    pub published_at: String,
    /// The devices, sorted by id.
    pub devices: Vec<DeviceEntry>,
}

/// One device of a [`DeviceSet`]: the gateway's `[[device]]` table, with a key reference
/// instead of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Meter id (protocol address as the pipeline knows it).
    pub id: String,
    /// The utility's meter number (informational; the gateway does not use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter_no: Option<String>,
    /// `cjt188`, `mbus`, `wmbus`, `modbus` or `hydrant`.
    pub protocol: String,
    /// Id of the gateway source the device is reached through.
    pub source: String,
    /// Protocol address on that source (M-Bus primary/secondary, Modbus unit...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Register map name (Modbus).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register_map: Option<String>,
    /// Name of the device's AES key in the gateway's key file (wM-Bus), never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ref: Option<String>,
}

/// What a gateway did with the device sets it received (retained, so the registry sees the
/// last outcome even if it was not listening).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSetReport {
    /// Wire version, [`DEVICE_SET_WIRE_VERSION`].
    pub v: u16,
    /// The reporting gateway.
    pub gateway: String,
    /// Version in force (0: none received yet; the TOML's own `[[device]]` tables apply).
    pub applied_version: u64,
    /// Number of devices in force.
    pub devices: usize,
    /// The last version refused, if the last set received was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_version: Option<u64>,
    /// Why it was refused (validation errors, one per line; never a key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When (RFC 3339).
    pub at: String,
}
