//! The registry's device sets (`model::DeviceSet`) turned into `[[device]]` tables: key
//! references resolved in the gateway's local key file, then the configuration file's own
//! device checks ([`crate::parse_device_set`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{ConfigError, ConfigErrors, DeviceConfig, GatewayConfig};

fn error(file: &Path, field: &str, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: file.to_owned(),
        line: 0,
        column: 0,
        field: field.to_owned(),
        message,
    }])
}

/// Reads a key file: a `[keys]` table of reference name → AES-128 key (32 hex digits).
///
/// # Errors
/// The file cannot be read or is not such a table (the message never quotes a key).
pub fn load_key_file(path: &Path) -> Result<BTreeMap<String, String>, ConfigErrors> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct KeyFile {
        #[serde(default)]
        keys: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        error(
            path,
            "registry.key_file",
            format!("cannot read the key file: {e}"),
        )
    })?;
    let file: KeyFile = toml::from_str(&text).map_err(|e| {
        error(
            path,
            "keys",
            format!(
                "not a [keys] table of name = \"hex\": {}",
                e.message().trim()
            ),
        )
    })?;
    Ok(file.keys)
}

/// The `[[device]]` tables of `set`, checked like the configuration file's own against the
/// sources and register maps of `config`. Key references are looked up in `config`'s key file
/// (`[registry] key_file`); a reference that is not there is an error.
///
/// # Errors
/// Every problem found; positions are lines of the set rendered as TOML.
pub fn devices_of_set(
    set: &model::DeviceSet,
    config: &GatewayConfig,
) -> Result<Vec<Spanned<DeviceConfig>>, ConfigErrors> {
    let name = PathBuf::from(format!(
        "device set {} version {}",
        set.gateway, set.version
    ));
    if set.v != model::DEVICE_SET_WIRE_VERSION {
        return Err(error(
            &name,
            "v",
            format!("unknown device-set wire version {}", set.v),
        ));
    }
    if set.gateway != config.gateway_id.as_str() {
        return Err(error(
            &name,
            "gateway",
            format!(
                "the set is for gateway `{}`, this is `{}`",
                set.gateway, config.gateway_id
            ),
        ));
    }
    let needs_keys = set.devices.iter().any(|d| d.key_ref.is_some());
    let keys = match (&config.registry.key_file, needs_keys) {
        (_, false) => BTreeMap::new(),
        (Some(path), true) => load_key_file(path)?,
        (None, true) => {
            return Err(error(
                &name,
                "device.key_ref",
                "the set names keys but [registry] key_file is not configured".into(),
            ));
        }
    };
    #[derive(Serialize)]
    struct Table<'a> {
        id: &'a str,
        protocol: &'a str,
        source: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        address: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        key: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        register_map: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Doc<'a> {
        device: Vec<Table<'a>>,
    }
    let mut missing = Vec::new();
    let mut tables = Vec::with_capacity(set.devices.len());
    for d in &set.devices {
        let key = match &d.key_ref {
            None => None,
            Some(r) => match keys.get(r) {
                Some(k) => Some(k.as_str()),
                None => {
                    missing.push(ConfigError {
                        file: name.clone(),
                        line: 0,
                        column: 0,
                        field: "device.key_ref".into(),
                        message: format!("device `{}`: no key `{r}` in the key file", d.id),
                    });
                    None
                }
            },
        };
        tables.push(Table {
            id: &d.id,
            protocol: &d.protocol,
            source: &d.source,
            address: d.address.as_deref(),
            key,
            register_map: d.register_map.as_deref(),
        });
    }
    if !missing.is_empty() {
        return Err(ConfigErrors(missing));
    }
    let text = toml::to_string(&Doc { device: tables })
        .map_err(|e| error(&name, "device", format!("cannot render the set: {e}")))?;
    crate::parse_device_set(&text, &name, config)
}
