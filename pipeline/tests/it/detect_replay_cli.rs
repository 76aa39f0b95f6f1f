//! `detect-replay` end to end: CSV in (rows shuffled, duplicated, one bad), JSON lines out.

use std::fmt::Write as _;
use std::process::Command;

#[test]
fn replays_csv_and_reports_bad_rows() {
    let dir = tempfile_dir();
    let meters = dir.join("meters.csv");
    let readings = dir.join("readings.csv");
    std::fs::write(
        &meters,
        "meter_id,meter_class,nominal_flow_q3_m3h,dma,role,time_zone\n\
         m1,residential_dn15,2.5,d1,customer,+08:00\n\
         m2,residential_dn15,2.5,d1,customer,+08:00\n",
    )
    .unwrap();
    // m1: 1.5 m³ in each of two hours (a burst: ≥ 0.4 × Q3, below Q3); m2: 10 L/h for
    // 12 hours (no leak); rows reversed, every m1 row twice, line 2 bad.
    let mut rows = Vec::new();
    let mut reg = 100.0_f64;
    for h in 0..12 {
        let used = if (10..13).contains(&h) { 1.5 } else { 0.01 };
        reg += used;
        let ts = format!("2026-01-01T{:02}:00:00+08:00", (h + 9) % 24);
        let ts = if h + 9 >= 24 {
            ts.replace("01T", "02T")
        } else {
            ts
        };
        rows.push(format!("m1,{ts},volume,{reg:.3},m3"));
        rows.push(format!("m1,{ts},volume,{reg:.3},m3"));
        rows.push(format!(
            "m2,{ts},volume,{:.3},m3",
            5.0 + f64::from(h) * 0.01
        ));
    }
    rows.reverse();
    let mut text = String::from("meter_id,ts,quantity,value,unit\nm1,not-a-time,volume,1,m3\n");
    for r in rows {
        writeln!(text, "{r}").unwrap();
    }
    std::fs::write(&readings, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_detect-replay"))
        .args([
            "--meters",
            meters.to_str().unwrap(),
            "--readings",
            readings.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("skipped readings.csv:2: ts \"not-a-time\""),
        "{stderr}"
    );
    assert!(stderr.contains("12 duplicates"), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["meter_id"], "m1");
    assert_eq!(lines[0]["kind"], "burst");
    // Read h is at local (h + 9):00 +08:00 = (h + 1):00Z; the burst shows at reads 10 and 11,
    // i.e. in the hours 10:00Z-11:00Z and 11:00Z-12:00Z.
    assert_eq!(lines[0]["first_seen"], "2026-01-01T10:00:00Z");
    assert_eq!(lines[0]["severity"], "warning");
    std::fs::remove_dir_all(&dir).ok();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("detect-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
