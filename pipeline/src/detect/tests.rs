//! Table-driven tests of every detector, in event time.
// Case tables are tuples of (name, input, expected): clearer inline than named aliases.
#![allow(clippy::type_complexity)]

use super::*;
use model::AlarmKind as K;

const T0: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z (08:00 in +08:00)

fn profile(q3: f64, role: Role) -> MeterProfile {
    MeterProfile {
        class: String::new(),
        q3_m3h: q3,
        dma: None,
        role,
        utc_offset_s: 8 * 3600,
        model: None,
    }
}

/// Feeds hourly volume reads built from hourly consumptions (litres), returns the events.
fn hourly(litres: &[f64]) -> Vec<AlarmEvent> {
    hourly_as(Role::Customer, litres)
}

/// [`hourly`] for a meter of `role`.
fn hourly_as(role: Role, litres: &[f64]) -> Vec<AlarmEvent> {
    let mut det = Detectors::new(DetectConfig::default());
    det.set_profile("m", &profile(2.5, role));
    let mut events = Vec::new();
    let mut reg = Decimal::new(1000, 0);
    obs(&mut det, T0, Quantity::Volume, reg, &mut events);
    for (i, l) in litres.iter().enumerate() {
        reg += Decimal::try_from(*l).unwrap() / Decimal::from(1000);
        obs(
            &mut det,
            T0 + (i as i64 + 1) * 3600,
            Quantity::Volume,
            reg,
            &mut events,
        );
    }
    events
}

fn obs(
    det: &mut Detectors,
    ts: i64,
    quantity: Quantity,
    value: Decimal,
    events: &mut Vec<AlarmEvent>,
) {
    det.observe(
        &Observation {
            meter: "m",
            ts,
            received: None,
            quantity,
            value,
            estimated: false,
        },
        events,
    );
}

fn raised(events: &[AlarmEvent]) -> Vec<(K, i64)> {
    events
        .iter()
        .filter(|e| e.transition == Transition::Raised)
        .map(|e| (e.kind, (e.first_seen - T0) / 3600))
        .collect()
}

fn cleared(events: &[AlarmEvent]) -> Vec<(K, i64)> {
    events
        .iter()
        .filter(|e| e.transition == Transition::Cleared)
        .map(|e| (e.kind, (e.at - T0) / 3600))
        .collect()
}

/// A household day: zero at night (local 23:00-06:00), use in the day. Index = UTC hour.
fn household_day() -> Vec<f64> {
    // UTC 0..24 = local 08..08.
    let local: [f64; 24] = [
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 20.0, 40.0, 30.0, 10.0, 5.0, 0.0, 12.0, 8.0, 0.0, 6.0, 10.0,
        15.0, 30.0, 40.0, 35.0, 25.0, 10.0, 0.0,
    ];
    (0..24).map(|utc| local[(utc + 8) % 24]).collect()
}

fn days(n: usize, f: impl Fn(usize, f64) -> f64) -> Vec<f64> {
    let day = household_day();
    (0..n * 24).map(|i| f(i, day[i % 24])).collect()
}

#[test]
fn leak_table() {
    struct Case {
        name: &'static str,
        litres: Vec<f64>,
        raised: Vec<(K, i64)>,
    }
    let cases = vec![
        Case {
            name: "normal household",
            litres: days(5, |_, l| l),
            raised: vec![],
        },
        Case {
            name: "busy day: 20 hours of use, 4 dry hours",
            litres: days(4, |i, l| if (24..44).contains(&i) { l.max(3.0) } else { l }),
            raised: vec![],
        },
        Case {
            name: "leak of 8 L/h from hour 30: raised after 24 h with first_seen at its start",
            litres: days(4, |i, l| if i >= 30 { l + 8.0 } else { l }),
            // Hour 28 (local 12:00) had use already, so the run starts there.
            raised: vec![(K::Leak, 28)],
        },
        Case {
            name: "leak starting at night (local 02:00 = UTC 18:00)",
            litres: days(4, |i, l| if i >= 42 { l + 5.0 } else { l }),
            raised: vec![(K::Leak, 42)],
        },
        Case {
            name: "23 hours of flow is not a leak",
            litres: days(3, |i, l| match i {
                30..53 => l + 5.0,
                29 | 53 => 0.0,
                _ => l,
            }),
            raised: vec![],
        },
    ];
    for c in cases {
        let events = hourly(&c.litres);
        let got: Vec<(K, i64)> = raised(&events)
            .into_iter()
            .filter(|(k, _)| *k == K::Leak)
            .collect();
        assert_eq!(got, c.raised, "{}", c.name);
    }
}

#[test]
fn leak_is_judged_on_customer_meters_only() {
    // A DMA inlet, outlet or an open hydrant carries flow day and night by nature: the DMA's
    // water balance judges losses there, not the customer-meter leak rules.
    let litres = days(4, |_, l| l + 800.0);
    assert!(raised(&hourly_as(Role::Customer, &litres)).contains(&(K::Leak, 0)));
    for role in [Role::Inlet, Role::Outlet, Role::Hydrant, Role::Pressure] {
        let leaks: Vec<_> = raised(&hourly_as(role, &litres))
            .into_iter()
            .filter(|(k, _)| *k == K::Leak)
            .collect();
        assert_eq!(leaks, vec![], "{role:?}");
    }
}

#[test]
fn leak_severity_by_rate_and_clear() {
    let mut l = days(3, |_, l| l + 80.0);
    l.extend(days(1, |_, _| 0.0));
    let events = hourly(&l);
    let r = events
        .iter()
        .find(|e| e.transition == Transition::Raised)
        .unwrap();
    assert_eq!((r.kind, r.severity), (K::Leak, AlarmSeverity::Critical));
    assert_eq!(r.detail["rule"], "continuous_flow");
    // Three dry hours clear it, but only once a night was quiet again (the night streak holds
    // it): the night of hours 90-91 resets the streak, the dry hour 92 clears it at 93.
    assert_eq!(cleared(&events), vec![(K::Leak, 93)]);
}

#[test]
fn night_flow_leak_needs_three_nights() {
    // A meter whose day has a dry hour but whose nights never drop to zero (a dripping
    // cistern refilling): local 02:00 and 03:00 = UTC 18:00 and 19:00.
    let l = days(5, |i, l| match i % 24 {
        18 | 19 => 6.0,
        _ => l,
    });
    let events = hourly(&l);
    let leaks: Vec<&AlarmEvent> = events
        .iter()
        .filter(|e| e.kind == K::Leak && e.transition != Transition::Seen)
        .collect();
    assert_eq!(leaks.len(), 1, "{leaks:?}");
    assert_eq!(leaks[0].detail["rule"], "night_flow");
    assert_eq!((leaks[0].first_seen - T0) / 3600, 18);
    // Third night: hour 18 + 48 ends at 68.
    assert_eq!((leaks[0].at - T0) / 3600, 68);
}

#[test]
fn burst_table() {
    // Q3 = 2.5 m³/h: threshold 1000 L/h for 2 hours.
    let cases: Vec<(&str, Vec<(usize, f64)>, Vec<(K, i64)>)> = vec![
        (
            "garden watering below burst",
            vec![(10, 900.0), (11, 900.0), (12, 900.0)],
            vec![],
        ),
        ("one hour above is not a burst", vec![(10, 1500.0)], vec![]),
        (
            "two hours at the threshold",
            vec![(10, 1000.0), (11, 1000.0)],
            vec![(K::Burst, 10)],
        ),
        (
            "three hours of 2500 L/h",
            vec![(10, 2500.0), (11, 2500.0), (12, 2500.0)],
            vec![(K::Burst, 10)],
        ),
        (
            "interrupted",
            vec![(10, 1500.0), (11, 10.0), (12, 1500.0)],
            vec![],
        ),
    ];
    for (name, extra, want) in cases {
        let l = days(1, |i, l| {
            extra.iter().find(|(h, _)| *h == i).map_or(l, |(_, v)| *v)
        });
        let events = hourly(&l);
        let got: Vec<(K, i64)> = raised(&events)
            .into_iter()
            .filter(|(k, _)| *k == K::Burst)
            .collect();
        assert_eq!(got, want, "{name}");
        if !want.is_empty() {
            assert_eq!(
                cleared(&events)
                    .iter()
                    .filter(|(k, _)| *k == K::Burst)
                    .count(),
                1,
                "{name}"
            );
        }
    }
}

#[test]
fn reverse_flow_table() {
    let cases: Vec<(&str, f64, Vec<(K, i64)>)> = vec![
        ("decrease of 40 L", -40.0, vec![(K::ReverseFlow, 4)]),
        (
            "decrease of 5 L is at the threshold, not above",
            -5.0,
            vec![],
        ),
        ("decrease of 6 L", -6.0, vec![(K::ReverseFlow, 4)]),
        // 50 m³ in an hour is far beyond Q4: a register reset, not flow.
        ("register reset", -50_000.0, vec![]),
    ];
    for (name, step, want) in cases {
        let l = days(1, |i, l| if i == 4 { step } else { l });
        let events = hourly(&l);
        let got: Vec<(K, i64)> = raised(&events)
            .into_iter()
            .filter(|(k, _)| *k != K::Leak)
            .collect();
        assert_eq!(got, want, "{name}");
    }
    // Cleared once a later step shows no decrease.
    let events = hourly(&days(1, |i, l| if i == 4 { -40.0 } else { l }));
    assert_eq!(cleared(&events), vec![(K::ReverseFlow, 6)]);
}

#[test]
fn stopped_meter_table() {
    let cases: Vec<(&str, usize, usize, Vec<(K, i64)>)> = vec![
        // (name, days of use, days of zero, raised)
        ("five-day vacation", 3, 5, vec![]),
        // The last use is UTC 23:00 of day 3, read at hour 72.
        ("stopped for 7 days", 3, 8, vec![(K::StoppedMeter, 72)]),
    ];
    for (name, used, zero, want) in cases {
        let l = days(used + zero, |i, l| if i < used * 24 { l } else { 0.0 });
        let events = hourly(&l);
        let got: Vec<(K, i64)> = raised(&events)
            .into_iter()
            .filter(|(k, _)| *k == K::StoppedMeter)
            .collect();
        assert_eq!(got, want, "{name}");
    }
    // A meter that never used water is not stopped.
    let events = hourly(&vec![0.0; 24 * 10]);
    assert!(raised(&events).is_empty());
}

#[test]
fn duplicates_and_swapped_reads_raise_nothing() {
    let mut det = Detectors::new(DetectConfig::default());
    let mut events = Vec::new();
    let l = household_day();
    let mut reg = Decimal::from(10);
    let mut reads = vec![(T0, reg)];
    for (i, v) in l.iter().cycle().take(72).enumerate() {
        reg += Decimal::try_from(*v).unwrap() / Decimal::from(1000);
        reads.push((T0 + (i as i64 + 1) * 3600, reg));
    }
    // Deliver every read twice and swap neighbours.
    let mut order: Vec<(i64, Decimal)> = Vec::new();
    for pair in reads.chunks(2) {
        order.extend(pair.iter().rev().copied());
        order.extend(pair.iter().copied());
    }
    for (ts, v) in order {
        obs(&mut det, ts, Quantity::Volume, v, &mut events);
    }
    assert!(raised(&events).is_empty(), "{events:?}");
}

#[test]
fn single_missing_reads_raise_nothing_and_keep_a_leak_run() {
    let mut det = Detectors::new(DetectConfig::default());
    let mut events = Vec::new();
    let mut reg = Decimal::from(10);
    obs(&mut det, T0, Quantity::Volume, reg, &mut events);
    for i in 1..=40i64 {
        reg += Decimal::new(20, 3);
        if i % 7 == 0 {
            continue; // missing read
        }
        obs(&mut det, T0 + i * 3600, Quantity::Volume, reg, &mut events);
    }
    let r = raised(&events);
    assert_eq!(r, vec![(K::Leak, 0)]);
}

#[test]
fn status_word_and_device_registers() {
    let mut det = Detectors::new(DetectConfig::default());
    let mut ev = Vec::new();
    obs(
        &mut det,
        T0,
        Quantity::StatusWord,
        Decimal::from(0x04),
        &mut ev,
    );
    obs(
        &mut det,
        T0 + 3600,
        Quantity::StatusWord,
        Decimal::from(0x20),
        &mut ev,
    );
    obs(
        &mut det,
        T0 + 7200,
        Quantity::StatusWord,
        Decimal::from(0x03),
        &mut ev,
    );
    obs(
        &mut det,
        T0 + 10800,
        Quantity::StatusWord,
        Decimal::from(0),
        &mut ev,
    );
    assert_eq!(
        raised(&ev),
        vec![(K::LowBattery, 0), (K::Tamper, 1), (K::ValveFault, 2)]
    );
    // Tamper stays: only a person closes it.
    assert_eq!(cleared(&ev), vec![(K::LowBattery, 1), (K::ValveFault, 3)]);
    let mut ev = Vec::new();
    obs(
        &mut det,
        T0 + 14400,
        Quantity::BatteryPercent,
        Decimal::from(9),
        &mut ev,
    );
    obs(
        &mut det,
        T0 + 18000,
        Quantity::BatteryPercent,
        Decimal::from(12),
        &mut ev,
    );
    obs(
        &mut det,
        T0 + 21600,
        Quantity::BatteryPercent,
        Decimal::from(16),
        &mut ev,
    );
    assert_eq!(raised(&ev), vec![(K::LowBattery, 4)]);
    assert_eq!(cleared(&ev), vec![(K::LowBattery, 6)]);
}

#[test]
fn hydrant_table() {
    let mut det = Detectors::new(DetectConfig::default());
    let mut ev = Vec::new();
    let mut o = |ts: i64, q: Quantity, v: Decimal, ev: &mut Vec<AlarmEvent>| {
        det.observe(
            &Observation {
                meter: "hydrant:h1",
                ts,
                received: None,
                quantity: q,
                value: v,
                estimated: false,
            },
            ev,
        );
    };
    o(
        T0,
        Quantity::StatusWord,
        Decimal::from(0x01 | 0x04 | 0x08),
        &mut ev,
    );
    o(T0, Quantity::Pressure, Decimal::new(12, 1), &mut ev);
    o(T0 + 600, Quantity::Tilt, Decimal::from(15), &mut ev);
    o(T0 + 1200, Quantity::OutletState, Decimal::ZERO, &mut ev);
    o(T0 + 1200, Quantity::Pressure, Decimal::new(35, 1), &mut ev);
    o(T0 + 1800, Quantity::Tilt, Decimal::from(2), &mut ev);
    let kinds: Vec<(K, Transition)> = ev.iter().map(|e| (e.kind, e.transition)).collect();
    assert_eq!(
        kinds,
        vec![
            (K::HydrantIllegalUse, Transition::Raised),
            (K::HydrantPressure, Transition::Raised),
            (K::HydrantTilt, Transition::Raised),
            (K::HydrantIllegalUse, Transition::Cleared),
            (K::HydrantPressure, Transition::Cleared),
            (K::HydrantTilt, Transition::Cleared),
        ]
    );
}

#[test]
fn estimated_reads_never_raise_or_clear() {
    let mut det = Detectors::new(DetectConfig::default());
    let mut ev = Vec::new();
    for (i, pct) in [(0, 5), (1, 50)] {
        det.observe(
            &Observation {
                meter: "m",
                ts: T0 + i * 3600,
                received: None,
                quantity: Quantity::BatteryPercent,
                value: Decimal::from(pct),
                estimated: true,
            },
            &mut ev,
        );
    }
    assert!(ev.is_empty());
}

#[test]
fn communication_loss_sweep_table() {
    // (name, interval of reads (s), silence before the sweep (s), raised?)
    let cases = [
        (
            "hourly, 3 h is not more than 3 intervals",
            3600,
            3 * 3600,
            false,
        ),
        ("hourly, 3 h 1 s", 3600, 3 * 3600 + 1, true),
        ("daily, 72 h", 86_400, 72 * 3600, false),
        ("daily, 73 h", 86_400, 73 * 3600, true),
    ];
    for (name, interval, silence, want) in cases {
        let mut det = Detectors::new(DetectConfig::default());
        let mut ev = Vec::new();
        for i in 0..10 {
            obs(
                &mut det,
                T0 + i * interval,
                Quantity::Volume,
                Decimal::new(i, 3),
                &mut ev,
            );
        }
        let last = T0 + 9 * interval;
        det.sweep(last + silence, SweepClock::Event, &mut ev);
        let got: Vec<(K, i64)> = ev
            .iter()
            .filter(|e| e.kind == K::CommunicationLoss && e.transition == Transition::Raised)
            .map(|e| (e.kind, e.first_seen))
            .collect();
        assert_eq!(!got.is_empty(), want, "{name}");
        if want {
            assert_eq!(got[0].1, last, "{name}: first_seen is the last read");
            // Reporting again clears it.
            obs(
                &mut det,
                last + silence + 1,
                Quantity::Volume,
                Decimal::new(10, 3),
                &mut ev,
            );
            assert_eq!(
                ev.last().map(|e| e.transition),
                Some(Transition::Cleared),
                "{name}"
            );
        }
    }
}

#[test]
fn state_is_within_budget() {
    // The per-meter struct: 104 bytes × the array's 1/8 spare = 117, within issue 20's 120.
    assert!(
        std::mem::size_of::<MeterDetect>() <= 104,
        "{}",
        std::mem::size_of::<MeterDetect>()
    );
    // The slot lives in VEE's former padding: its state must not grow for it.
    assert_eq!(std::mem::size_of::<crate::vee::MeterState>(), 104);
}

/// One observation of meter `m`.
fn obs_of(meter: &str, ts: i64, quantity: Quantity, value: Decimal) -> Observation<'_> {
    Observation {
        meter,
        ts,
        received: None,
        quantity,
        value,
        estimated: false,
    }
}

#[test]
fn detectors_through_vee_add_at_most_120_bytes_per_meter_and_behave_the_same() {
    use crate::vee::{MeterState, Vee, VeeConfig};
    const N: usize = 5_000;
    let ids: Vec<String> = (0..N).map(|i| format!("cjt188:{i:014}")).collect();
    let mut vee = Vee::new(VeeConfig::default());
    let mut live = Detectors::new(DetectConfig::default());
    let mut own = Detectors::new(DetectConfig::default());
    let (mut ev_live, mut ev_own) = (Vec::new(), Vec::new());
    // 30 hours of 10 L/h (a leak after 24), meter by meter interleaved: the array grows as a
    // worker's does when meters first report.
    for h in 0..30 {
        for (i, id) in ids.iter().enumerate() {
            let v = Decimal::new(1000 + (i as i64 % 7) + 10 * h, 3);
            let o = obs_of(id, T0 + h * 3600, Quantity::Volume, v);
            live.on(&mut vee).observe(&o, &mut ev_live);
            own.observe(&o, &mut ev_own);
        }
        if h == 10 {
            // Every wholesale replacement of VEE's state (journal recovery, registry refresh,
            // a batch's commit) keeps the slot.
            for id in &ids[..N / 2] {
                vee.insert_state(id, MeterState::new(1, 1));
            }
            let mut batch = crate::vee::StateMap::default();
            for id in &ids[N / 2..] {
                batch.insert(id.as_str().into(), MeterState::new(2, 2));
            }
            vee.commit(&batch);
        }
    }
    live.on(&mut vee)
        .sweep(T0 + 200 * 3600, SweepClock::Event, &mut ev_live);
    own.sweep(T0 + 200 * 3600, SweepClock::Event, &mut ev_own);
    assert_eq!(live.meters(), N);
    assert_eq!(vee.meters(), N);
    let key = |e: &AlarmEvent| (e.meter.clone(), e.kind.as_str(), e.at, e.transition as u8);
    ev_live.sort_by_key(key);
    ev_own.sort_by_key(key);
    assert_eq!(ev_live, ev_own);
    let raised = |kind: K| {
        ev_live
            .iter()
            .filter(|e| e.kind == kind && e.transition == Transition::Raised)
            .count()
    };
    // Every meter's continuous flow raised its leak, and its silence a communication loss.
    assert_eq!(raised(K::Leak), N);
    assert_eq!(raised(K::CommunicationLoss), N);
    let view = live.on(&mut vee);
    for id in &ids {
        assert_eq!(view.state(id), own.state(id), "{id}");
    }
    // The budget: the dense array only (the index is VEE's map, which did not grow for it).
    let per_meter = live.state_bytes() as f64 / N as f64;
    assert!(per_meter <= 117.0, "{per_meter} bytes per meter");
    let mut plain = Vee::new(VeeConfig::default());
    for id in &ids {
        plain.insert_state(id, MeterState::new(1, 1));
    }
    assert_eq!(vee.state_bytes(), plain.state_bytes());
}

#[test]
fn clock_jump_back_is_not_reverse_flow() {
    // Hourly reads; from 10:00 the meter clock is 90 min behind, so the read taken at 11:00
    // carries 09:30 and sorts before the higher 10:00 read... as replay orders them by time.
    let mut det = Detectors::new(DetectConfig::default());
    let mut ev = Vec::new();
    let reg = |h: i64| Decimal::new(1000 + 30 * h, 3);
    let mut reads: Vec<(i64, Decimal)> = (0..=10).map(|h| (T0 + h * 3600, reg(h))).collect();
    reads.extend((11..20).map(|h| (T0 + h * 3600 - 5400, reg(h))));
    reads.sort();
    for (ts, v) in reads {
        obs(&mut det, ts, Quantity::Volume, v, &mut ev);
    }
    assert!(
        !raised(&ev).iter().any(|(k, _)| *k == K::ReverseFlow),
        "{ev:?}"
    );
}

#[test]
fn state_round_trips_through_bytes() {
    let mut det = Detectors::new(DetectConfig::default());
    let mut ev = Vec::new();
    for (i, l) in days(2, |_, l| l + 9.0).iter().enumerate() {
        obs(
            &mut det,
            T0 + i as i64 * 3600,
            Quantity::Volume,
            Decimal::try_from(*l).unwrap(),
            &mut ev,
        );
    }
    let st = *det.state("m").unwrap();
    assert_eq!(MeterDetect::from_bytes(&st.to_bytes()), Some(st));
    assert_eq!(MeterDetect::from_bytes(&st.to_bytes()[..40]), None);
    assert_eq!(MeterDetect::from_bytes(&[9; 120]), None);
}

/// A volume read of meter `m` at `T0 + hours`, actual or estimated, as the worker hands it over.
fn volume_reading(hours: i64, m3: i64, estimated: bool) -> Reading {
    let mut r = testkit::volume_read(
        "cjt188:00000000000001",
        time::OffsetDateTime::from_unix_timestamp(T0 + hours * 3600).unwrap(),
        Decimal::from(m3),
    );
    if estimated {
        r.quality = Quality::Estimated {
            method: model::EstimationMethod::Linear,
        };
    }
    r
}

#[test]
fn prolonged_estimation_table() {
    // (name, batches of (hour, m³, estimated), kinds and transitions raised)
    type Batch = Vec<(i64, i64, bool)>;
    let cases: Vec<(&str, Vec<Batch>, Vec<(K, Transition)>)> = vec![
        (
            "estimates for 6 days are not prolonged",
            vec![vec![(0, 100, false)], vec![(144, 101, true)]],
            vec![],
        ),
        (
            "estimates reaching 7 days past the last actual read raise",
            vec![
                vec![(0, 100, false)],
                vec![(24 * 7, 101, true), (24 * 8, 102, true)],
            ],
            vec![
                (K::ProlongedEstimation, Transition::Raised),
                (K::ProlongedEstimation, Transition::Seen),
            ],
        ),
        (
            "the next actual read clears it",
            vec![
                vec![(0, 100, false)],
                vec![(24 * 8, 102, true)],
                vec![(24 * 9, 103, false)],
            ],
            vec![
                (K::ProlongedEstimation, Transition::Raised),
                (K::ProlongedEstimation, Transition::Cleared),
            ],
        ),
        (
            "a gap filled by estimates that an actual read of the same batch closes is not one",
            vec![
                vec![(0, 100, false)],
                vec![(24 * 8, 102, true), (24 * 9, 103, false)],
            ],
            vec![],
        ),
    ];
    for (name, batches, want) in cases {
        let mut det = Detectors::new(DetectConfig::default());
        let mut got = Vec::new();
        for batch in batches {
            let readings: Vec<Reading> = batch
                .into_iter()
                .map(|(h, v, e)| volume_reading(h, v, e))
                .collect();
            got.extend(
                det.observe_readings(&readings)
                    .into_iter()
                    .filter(|e| e.kind == K::ProlongedEstimation)
                    .map(|e| (e.kind, e.transition)),
            );
        }
        assert_eq!(got, want, "{name}");
    }
    // first_seen is the last actual read.
    let mut det = Detectors::new(DetectConfig::default());
    det.observe_readings(&[volume_reading(0, 100, false)]);
    let ev = det.observe_readings(&[volume_reading(24 * 7, 101, true)]);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].first_seen, T0);
}
