//! The `simulate` binary: ground truth output and a small back-fill with its summary.

use std::process::Command;

fn simulate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_simulate"))
}

#[test]
fn ground_truth_prints_the_committed_truth() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let out = simulate()
        .arg("ground-truth")
        .arg(dir.join("all-faults.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("all-faults.truth.json")).unwrap())
            .unwrap();
    assert_eq!(printed, committed);
}

#[test]
fn backfill_without_subcommand_prints_a_summary() {
    let out = simulate()
        .args(["--meters", "500", "--days", "2", "--no-progress"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("meters            500"), "{text}");
    assert!(
        text.contains("readings          24000 produced, 24000 delivered"),
        "{text}"
    );
    assert!(text.contains("meter-days/s"), "{text}");
}

#[test]
fn bad_scenario_is_reported_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "name = \"x\"\nseed = 1\nstart = \"2026-01-01T00:00:00Z\"\ndays = 1\n[fleet]\nhouseholds = 2\n[[faults]]\nkind = \"leak\"\nmeter = 7\nfrom = \"2026-01-01T01:00:00Z\"\nrate_lph = 1.0\n",
    )
    .unwrap();
    let out = simulate().arg("ground-truth").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("faults[0].meter: 7 is not a meter index (0..2)"),
        "{err}"
    );
}

#[test]
fn score_reads_truth_and_alarms() {
    let dir = tempfile::tempdir().unwrap();
    let scenarios = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let truth = scenarios.join("leak-detection.truth.json");
    // One correct leak alarm (model::Alarm form), one false one (detection form).
    let dets = serde_json::json!([
        {"meter": "cjt188:78330000000010", "kind": "leak", "severity": "warning",
         "raised_at": "2026-01-09T00:00:00Z", "detail": {}},
        {"meter": "cjt188:78330000000011", "kind": "leak", "at": "2026-01-09T00:00:00Z"}
    ]);
    let path = dir.path().join("dets.json");
    std::fs::write(&path, dets.to_string()).unwrap();
    let out = simulate()
        .args(["score", "--kinds", "leak", "--truth"])
        .arg(&truth)
        .arg("--detections")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let leak = text.lines().find(|l| l.starts_with("leak ")).unwrap();
    let cols: Vec<&str> = leak.split_whitespace().collect();
    assert_eq!(cols, ["leak", "12", "1", "2", "0.500", "0.083"], "{text}");
}
