//! `gateway check-config FILE`: exit 0 for a valid file, errors with file:line and field and
//! exit 1 otherwise.

use std::process::Command;

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("check-config")
        .arg(path)
        .output()
        .expect("run gateway");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_example_is_valid() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../edge-config/examples/gateway.toml");
    let (code, out, err) = check(&example);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok (gateway gw-plant-north, 8 sources, 3 devices)"),
        "{out}"
    );
}

#[test]
fn errors_name_file_line_and_field_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"gateway_id = "gw-1"

[uplink]
broker = "mqtt://127.0.0.1:1883"
partitions = 0

[spool]
dir = "spool"

[[source]]
id = "nbiot"
kind = "coap"
listen = "0.0.0.0:5683"
auth = "none"
[[device]]
id = "cjt188:78330011223344"
protocol = "cjt188"
source = "nbiot-typo"
"#,
    )
    .unwrap();
    let (code, _, err) = check(&path);
    assert_eq!(code, 1, "{err}");
    let file = path.display().to_string();
    assert!(
        err.contains(&format!(
            "{file}:5:14: `uplink.partitions`: must be at least 1"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:18:10: `device.source`: device `cjt188:78330011223344`: no source with id `nbiot-typo`")),
        "{err}"
    );

    // A type error inside a source table points at the key's own line.
    std::fs::write(
        &path,
        "gateway_id = \"gw-1\"\n[uplink]\nbroker = \"mqtt://h\"\n[spool]\ndir = \"s\"\n[[source]]\nid = \"p\"\nkind = \"http_push\"\nlisten = \"0.0.0.0:8080\"\nsecret = 42\n",
    )
    .unwrap();
    let (code, _, err) = check(&path);
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{file}:10:")), "{err}");
    assert!(err.contains("`secret`"), "{err}");

    // A missing file is an error too.
    let (code, _, err) = check(&dir.path().join("missing.toml"));
    assert_eq!(code, 1);
    assert!(err.contains("cannot read the file"), "{err}");
}
