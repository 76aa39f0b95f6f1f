//! MQTT topic names, built in one place so the gateway, the pipeline, the API and the tests
//! cannot drift (PROTOCOLS.md; `root` is the deployment's topic root, e.g. `wm/v1`).

/// Reading batches of one partition: `{root}/readings/{partition}`.
pub fn readings(root: &str, partition: u16) -> String {
    format!("{root}/readings/{partition}")
}

/// Filter for the reading batches of every partition: `{root}/readings/+`.
pub fn readings_all(root: &str) -> String {
    format!("{root}/readings/+")
}

/// The pipeline's acknowledgements of stored batches to one gateway: `{root}/{gw}/ingest-ack`.
pub fn ingest_ack(root: &str, gateway: &str) -> String {
    format!("{root}/{gateway}/ingest-ack")
}

/// A gateway's retained status (online/offline, health): `{root}/{gw}/status`.
pub fn status(root: &str, gateway: &str) -> String {
    format!("{root}/{gateway}/status")
}

/// A command to one device behind a gateway: `{root}/{gw}/cmd/{device}`.
pub fn command(root: &str, gateway: &str, device: &str) -> String {
    format!("{root}/{gateway}/cmd/{device}")
}

/// Filter for every command to one gateway: `{root}/{gw}/cmd/#`.
pub fn commands_of(root: &str, gateway: &str) -> String {
    format!("{root}/{gateway}/cmd/#")
}

/// A gateway's command acknowledgements: `{root}/{gw}/cmd-ack`.
pub fn command_ack(root: &str, gateway: &str) -> String {
    format!("{root}/{gateway}/cmd-ack")
}

/// A gateway's alarms: `{root}/{gw}/alarms`.
pub fn alarms(root: &str, gateway: &str) -> String {
    format!("{root}/{gateway}/alarms")
}

/// The device set pushed to one gateway (retained): `{root}/{gw}/config/devices`.
pub fn device_set(root: &str, gateway: &str) -> String {
    format!("{root}/{gateway}/config/devices")
}

/// A gateway's report on the device set it applied: `{root}/{gw}/status/device-set`.
pub fn device_set_report(root: &str, gateway: &str) -> String {
    format!("{root}/{gateway}/status/device-set")
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_protocols_md() {
        assert_eq!(super::readings("wm/v1", 7), "wm/v1/readings/7");
        assert_eq!(super::readings_all("wm/v1"), "wm/v1/readings/+");
        assert_eq!(super::ingest_ack("wm/v1", "gw1"), "wm/v1/gw1/ingest-ack");
        assert_eq!(super::status("r", "g"), "r/g/status");
        assert_eq!(super::command("r", "g", "m1"), "r/g/cmd/m1");
        assert_eq!(super::commands_of("r", "g"), "r/g/cmd/#");
        assert_eq!(super::command_ack("r", "g"), "r/g/cmd-ack");
        assert_eq!(super::alarms("r", "g"), "r/g/alarms");
        assert_eq!(super::device_set("r", "g"), "r/g/config/devices");
        assert_eq!(super::device_set_report("r", "g"), "r/g/status/device-set");
    }
}
