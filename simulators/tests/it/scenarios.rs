//! Scenario files round-trip, their ground truth is stable, and each fault does what it says.

use std::collections::HashMap;
use std::path::PathBuf;

use simulators::engine::{Delivery, Emission, Engine, ground_truth};
use simulators::scenario::Scenario;
use simulators::truth::{Detection, TruthKind, score};

fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn scenario_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(scenarios_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "expected the shipped scenarios");
    files
}

fn load(name: &str) -> Scenario {
    Scenario::load(&scenarios_dir().join(format!("{name}.toml"))).unwrap()
}

#[test]
fn every_scenario_file_round_trips_through_toml_and_json() {
    for path in scenario_files() {
        let s = Scenario::load(&path).unwrap();
        let toml = s.to_toml().unwrap();
        assert_eq!(Scenario::from_toml(&toml, "again").unwrap(), s, "{path:?}");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            serde_json::from_str::<Scenario>(&json).unwrap(),
            s,
            "{path:?}"
        );
    }
}

/// The committed `<name>.truth.json` is the explicit ground truth of each scenario; the
/// engine must reproduce it exactly. Regenerate with `simulate ground-truth FILE`.
#[test]
fn ground_truth_matches_committed_truth_files() {
    for path in scenario_files() {
        let s = Scenario::load(&path).unwrap();
        let truth = serde_json::to_value(ground_truth(&s)).unwrap();
        let truth_path = path.with_extension("truth.json");
        let committed: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&truth_path).unwrap()).unwrap();
        assert_eq!(truth, committed, "{truth_path:?} is stale");
    }
}

#[test]
fn all_faults_truth_has_every_kind_once() {
    let truth = ground_truth(&load("all-faults"));
    let mut kinds: HashMap<TruthKind, usize> = HashMap::new();
    for e in &truth.events {
        *kinds.entry(e.kind).or_default() += 1;
    }
    for kind in [
        TruthKind::Leak,
        TruthKind::Burst,
        TruthKind::MainsBurst,
        TruthKind::ReverseFlow,
        TruthKind::Tamper,
        TruthKind::StoppedMeter,
        TruthKind::LowBattery,
        TruthKind::CommunicationLoss,
        TruthKind::ClockSkew,
        TruthKind::DuplicateFrames,
        TruthKind::OutOfOrder,
        TruthKind::CorruptedFrames,
        TruthKind::Rollover,
        TruthKind::MeterReplacement,
    ] {
        assert_eq!(
            kinds.get(&kind),
            Some(&1),
            "{kind:?} in {:#?}",
            truth.events
        );
    }
    let dup = truth
        .events
        .iter()
        .find(|e| e.kind == TruthKind::DuplicateFrames)
        .unwrap();
    assert_eq!(dup.detail["frames"], 6);
    let corrupt = truth
        .events
        .iter()
        .find(|e| e.kind == TruthKind::CorruptedFrames)
        .unwrap();
    assert_eq!(corrupt.detail["frames"], 3);
}

fn run(s: &Scenario) -> Vec<Emission> {
    let mut out = Vec::new();
    Engine::new(s.clone()).run(|e| out.push(*e));
    out
}

fn of(emissions: &[Emission], meter: u32) -> Vec<Emission> {
    emissions
        .iter()
        .filter(|e| e.meter == meter)
        .copied()
        .collect()
}

fn hour(s: &Scenario, h: i64) -> i64 {
    s.start.unix_timestamp() + h * 3600
}

#[test]
fn faults_change_readings_as_described() {
    let s = load("all-faults");
    let all = run(&s);

    // Leak from day 2 02:00 at 35 L/h: from then on every hour uses at least 35 L.
    let leak = of(&all, 1);
    let leak_start = time::macros::datetime!(2026-06-03 02:00 UTC).unix_timestamp();
    for w in leak.windows(2) {
        if w[0].ts >= leak_start {
            assert!(w[1].register_ml - w[0].register_ml >= 35_000, "{w:?}");
        }
    }

    // Reverse flow 12:00–14:00 on day 4 at 40 L/h: the register goes down in that span only.
    let rev = of(&all, 3);
    let decreases: Vec<i64> = rev
        .windows(2)
        .filter(|w| w[1].register_ml < w[0].register_ml)
        .map(|w| w[1].ts)
        .collect();
    assert!(!decreases.is_empty());
    let (from, until) = (hour(&s, 3 * 24 + 12), hour(&s, 3 * 24 + 14));
    assert!(
        decreases.iter().all(|t| *t > from && *t <= until),
        "{decreases:?}"
    );
    assert!(rev.last().unwrap().reverse_ml == 80_000);

    // Tamper: status latched from the start time.
    let tamper = of(&all, 4);
    assert!(
        tamper
            .iter()
            .all(|e| e.status.tamper == (e.ts > hour(&s, 5 * 24)))
    );

    // Stopped meter: the register is frozen after the stop.
    let stopped = of(&all, 5);
    let frozen: Vec<u64> = stopped
        .iter()
        .filter(|e| e.ts > hour(&s, 7 * 24))
        .map(|e| e.register_ml)
        .collect();
    assert!(frozen.windows(2).all(|w| w[0] == w[1]));

    // Communication loss: 72 readings marked lost.
    let lost = of(&all, 7)
        .iter()
        .filter(|e| e.delivery == Delivery::Lost)
        .count();
    assert_eq!(lost, 72);

    // Clock skew: meter time 90 minutes behind from day 1.
    let skew = of(&all, 8);
    assert!(
        skew.iter()
            .all(|e| e.meter_ts - e.ts == if e.ts > hour(&s, 24) { -5400 } else { 0 })
    );

    // Duplicates: 6 readings marked for double delivery.
    let dups = of(&all, 9)
        .iter()
        .filter(|e| e.delivery == Delivery::Duplicate)
        .count();
    assert_eq!(dups, 6);

    // Out of order: delivery order is not time order inside the span.
    let ooo = of(&all, 10);
    let swaps = ooo.windows(2).filter(|w| w[1].ts < w[0].ts).count();
    assert_eq!(swaps, 2);
    assert_eq!(ooo.len(), 14 * 24);

    // Rollover: register wraps once below 1.5 m³ + a day or two of use.
    let roll = of(&all, 12);
    let wraps = roll
        .windows(2)
        .filter(|w| w[1].register_ml < w[0].register_ml)
        .count();
    assert_eq!(wraps, 1);

    // Replacement: register restarts near zero at 08:00 on day 10.
    let repl = of(&all, 13);
    let after = repl.iter().find(|e| e.ts > hour(&s, 10 * 24 + 8)).unwrap();
    assert!(after.register_ml < 1_000_000, "{after:?}");
}

#[test]
fn battery_decline_reaches_low_battery_once() {
    let s = load("all-faults");
    let truth = ground_truth(&s);
    let low = truth
        .events
        .iter()
        .find(|e| e.kind == TruthKind::LowBattery)
        .unwrap();
    let all = run(&s);
    let batt = of(&all, 6);
    let first_low = batt.iter().find(|e| e.status.battery_low).unwrap();
    assert_eq!(first_low.ts, low.from.unix_timestamp());
    assert!(batt.last().unwrap().battery_pct < 10);
}

#[test]
fn dma_inflow_is_consumption_plus_losses() {
    let s = load("all-faults");
    let truth = ground_truth(&s);
    assert_eq!(truth.dmas.len(), 3);
    assert_eq!(truth.dmas.iter().map(|d| d.meters).sum::<u32>(), 60);
    for d in &truth.dmas {
        assert_eq!(d.inflow_l, d.consumption_l + d.losses_l);
        // 14 days × 24 h × 120 L/h background leakage, plus the mains burst in DMA 1.
        let burst = if d.dma == 1 { 6 * 20_000 } else { 0 };
        assert_eq!(d.losses_l, 14 * 24 * 120 + burst);
    }
    // Tamper and the stopped meter make registered < consumed in their DMAs.
    let consumed: i64 = truth.dmas.iter().map(|d| d.consumption_l).sum();
    let registered: i64 = truth.dmas.iter().map(|d| d.registered_l).sum();
    assert!(registered < consumed);
}

#[test]
fn perfect_detector_scores_one_and_blind_detector_scores_zero_recall() {
    let truth = ground_truth(&load("leak-detection"));
    let perfect: Vec<Detection> = truth
        .events
        .iter()
        .map(|e| Detection {
            meter: e.meter.clone(),
            kind: e.kind,
            at: e.from + time::Duration::hours(1),
        })
        .collect();
    let kinds = [TruthKind::Leak, TruthKind::Burst];
    let s = score(&truth, &perfect, &kinds, time::Duration::hours(1));
    assert_eq!(s.overall.truth, 15);
    assert_eq!((s.overall.precision(), s.overall.recall()), (1.0, 1.0));
    let blind = score(&truth, &[], &kinds, time::Duration::hours(1));
    assert_eq!(blind.overall.recall(), 0.0);
    assert_eq!(blind.overall.precision(), 1.0);
}
