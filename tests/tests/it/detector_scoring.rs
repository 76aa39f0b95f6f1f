//! Scores the anomaly detectors against the simulators' ground truth: every scenario runs on the
//! simulated clock, its readings go through `detect-replay`'s code path (`pipeline::detect::replay`)
//! as the transports would carry them (CJ/T 188 registers with 10 L resolution and the ST status
//! word, M-Bus registers in litres; lost and corrupted frames dropped, duplicated frames twice,
//! swapped frames swapped), and `simulators::truth::score` gives precision and recall per kind.
//! The printed table is the one in `docs/detectors.md`.

use model::MeterAddress;
use pipeline::detect::replay::{self, Row};
use pipeline::detect::{DetectConfig, MeterProfile, Role};
use rust_decimal::Decimal;
use simulators::engine::{Delivery, Engine};
use simulators::profile::Profile;
use simulators::scenario::Scenario;
use simulators::truth::{Detection, KindScore, Score, TruthKind, score};

const KINDS: [TruthKind; 7] = [
    TruthKind::Leak,
    TruthKind::Burst,
    TruthKind::ReverseFlow,
    TruthKind::Tamper,
    TruthKind::StoppedMeter,
    TruthKind::LowBattery,
    TruthKind::CommunicationLoss,
];

fn scenario_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../simulators/scenarios")
        .join(format!("{name}.toml"))
}

/// Runs a scenario through the detectors and scores it.
fn run(name: &str) -> Score {
    let scenario = Scenario::load(&scenario_path(name)).unwrap();
    let offset_s = i32::from(scenario.utc_offset_hours) * 3600;
    let mut engine = Engine::new(scenario);
    let population = engine.population().clone();
    let meters: Vec<(String, MeterProfile)> = population
        .meters
        .iter()
        .map(|m| {
            let (class, q3) = match m.profile {
                Profile::Household => ("residential_dn15", 2.5),
                Profile::Commercial => ("commercial_dn25", 6.3),
            };
            (
                m.id.as_str().to_owned(),
                MeterProfile {
                    class: class.into(),
                    q3_m3h: q3,
                    dma: Some(format!("dma-{}", m.dma)),
                    role: Role::Customer,
                    utc_offset_s: offset_s,
                    model: None,
                },
            )
        })
        .collect();
    let mut rows = Vec::new();
    engine.run(|e| {
        let copies = match e.delivery {
            Delivery::Lost | Delivery::Corrupt => 0,
            Delivery::Duplicate => 2,
            Delivery::Normal => 1,
        };
        let Some(spec) = population.meters.get(e.meter as usize) else {
            return;
        };
        let cjt188 = matches!(spec.address, MeterAddress::Cjt188 { .. });
        let register = if cjt188 {
            simulators::frames::m3_2dp(e.register_ml)
        } else {
            e.register_m3()
        };
        for _ in 0..copies {
            let line = rows.len() + 1;
            rows.push(Row {
                meter: spec.id.as_str().to_owned(),
                ts: e.meter_ts,
                quantity: model::Quantity::Volume,
                value: register,
                line,
            });
            if cjt188 {
                rows.push(Row {
                    meter: spec.id.as_str().to_owned(),
                    ts: e.meter_ts,
                    quantity: model::Quantity::StatusWord,
                    value: Decimal::from(simulators::frames::cjt188_status(e)),
                    line: line + 1,
                });
            } else {
                rows.push(Row {
                    meter: spec.id.as_str().to_owned(),
                    ts: e.meter_ts,
                    quantity: model::Quantity::BatteryPercent,
                    value: Decimal::from(e.battery_pct),
                    line: line + 1,
                });
            }
        }
    });
    let truth = engine.ground_truth();
    let (alarms, stats) = replay::run(DetectConfig::default(), &meters, rows);
    println!(
        "{name}: detector state {} bytes for {} meters ({} per meter; struct {} bytes); replay's own meter-id map {} bytes ({} per meter; the worker uses VEE's map)",
        stats.state_bytes,
        stats.meters,
        stats.state_bytes / stats.meters.max(1),
        std::mem::size_of::<pipeline::detect::MeterDetect>(),
        stats.index_bytes,
        stats.index_bytes / stats.meters.max(1),
    );
    // Issue 20's budget: the detectors add at most 120 bytes per meter on top of VEE's state.
    assert!(stats.meters > 0, "{name}: no detector state");
    assert!(
        stats.state_bytes <= 120 * stats.meters,
        "{name}: {} detector bytes for {} meters is over 120 per meter",
        stats.state_bytes,
        stats.meters
    );
    let detections: Vec<Detection> = alarms
        .iter()
        .filter_map(|a| {
            Some(Detection {
                meter: a.meter_id.clone(),
                kind: TruthKind::from_alarm(a.kind)?,
                at: a.first_seen,
            })
        })
        .collect();
    for d in &detections {
        let matched = truth.events.iter().any(|e| {
            e.kind == d.kind
                && e.meter == d.meter
                && d.at >= e.from - time::Duration::hours(24)
                && d.at <= e.until.unwrap_or(truth.end) + time::Duration::hours(24)
        });
        if !matched {
            eprintln!("{name}: false positive {d:?}");
        }
    }
    let s = score(&truth, &detections, &KINDS, time::Duration::hours(24));
    print_table(name, &s);
    s
}

fn print_table(name: &str, s: &Score) {
    println!("\n{name}");
    println!(
        "| kind | truth | detected | detections | precision | recall |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    );
    let line = |k: &str, v: &KindScore| {
        println!(
            "| {k} | {} | {} | {} | {:.3} | {:.3} |",
            v.truth,
            v.detected,
            v.detections,
            v.precision(),
            v.recall()
        );
    };
    for (k, v) in &s.by_kind {
        line(serde_json::to_value(k).unwrap().as_str().unwrap_or("?"), v);
    }
    line("overall", &s.overall);
}

#[test]
fn detectors_meet_precision_and_recall_targets() {
    let mut overall = KindScore::default();
    let mut failures = Vec::new();
    for name in ["leak-detection", "all-faults", "detector-traps"] {
        let s = run(name);
        for (k, v) in &s.by_kind {
            if v.truth > 0 && v.recall() < 0.85 || v.precision() < 0.85 {
                failures.push(format!(
                    "{name} {k:?}: precision {:.3} recall {:.3}",
                    v.precision(),
                    v.recall()
                ));
            }
        }
        overall.detected += s.overall.detected;
        overall.truth += s.overall.truth;
        overall.true_positives += s.overall.true_positives;
        overall.detections += s.overall.detections;
    }
    println!(
        "\nall scenarios: precision {:.3}, recall {:.3} ({} truth events, {} detections)",
        overall.precision(),
        overall.recall(),
        overall.truth,
        overall.detections
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(overall.precision() >= 0.95 && overall.recall() >= 0.95);
}
