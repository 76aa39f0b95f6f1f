//! Frames the simulator emits decode with `decoders` to the values the model produced.

use std::collections::HashMap;

use decoders::{RecordValue, wmbus};
use rust_decimal::Decimal;
use simulators::engine::{Delivery, Emission, Engine};
use simulators::frames::{
    self, cjt188_reply, corrupt_checksummed, corrupt_wmbus, m3_2dp, mbus_rsp_ud, wmbus_key,
    wmbus_telegram,
};
use simulators::scenario::{Fault, Scenario};
use time::macros::datetime;

fn scenario() -> Scenario {
    let mut s = Scenario::plain(20, 2, 11, datetime!(2026-03-01 0:00 UTC));
    s.fleet.mbus_meters = 10;
    s.faults.push(Fault::MagneticTamper {
        meter: 2,
        from: datetime!(2026-03-01 05:00 UTC),
        registered_share: 0.5,
    });
    s.faults.push(Fault::BatteryDecline {
        meter: 12,
        from: datetime!(2026-03-01 00:00 UTC),
        days_to_empty: 1.0,
    });
    s
}

fn emissions(s: &Scenario) -> (Engine, Vec<Emission>) {
    let mut engine = Engine::new(s.clone());
    let mut out = Vec::new();
    engine.run(|e| out.push(*e));
    (engine, out)
}

fn number(frame: &decoders::DecodedFrame, quantity: &str, storage: u32) -> Decimal {
    frame
        .records
        .iter()
        .find(|r| r.quantity == quantity && r.storage == storage)
        .and_then(|r| match &r.value {
            RecordValue::Number(n) => Some(*n),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {quantity} in {frame:#?}"))
}

#[test]
fn cjt188_uplinks_decode_to_the_model_register_and_status() {
    let s = scenario();
    let (engine, all) = emissions(&s);
    let mut checked = 0;
    for e in all.iter().filter(|e| e.meter < 10) {
        let spec = &engine.population().meters[e.meter as usize];
        let bytes = cjt188_reply(spec, e, 7, s.utc_offset_hours).unwrap();
        let frame = decoders::cjt188::decode(&bytes).unwrap();
        assert_eq!(
            frame.meter.id,
            spec.id.as_str().trim_start_matches("cjt188:")
        );
        assert_eq!(number(&frame, "volume", 0), m3_2dp(e.register_ml));
        assert_eq!(
            number(&frame, "volume_settlement", 0),
            m3_2dp(e.settlement_ml)
        );
        let st = number(&frame, "status_word", 0);
        assert_eq!(st, Decimal::from(frames::cjt188_status(e)));
        let clock = frame
            .records
            .iter()
            .find(|r| r.quantity == "date_time")
            .unwrap();
        // Meter clock is local time (UTC+8): the 01:00Z reading says 09:00.
        if e.ts == datetime!(2026-03-01 01:00 UTC).unix_timestamp() {
            assert_eq!(clock.value, RecordValue::Date("2026-03-01T09:00:00".into()));
        }
        checked += 1;
    }
    assert_eq!(checked, 10 * 48);
    // The tampered meter's status carries the magnetic bit after the fault starts.
    let tampered = all.iter().rev().find(|e| e.meter == 2).unwrap();
    assert_ne!(frames::cjt188_status(tampered) & frames::ST_MAGNETIC, 0);
}

#[test]
fn mbus_rsp_ud_decodes_to_litres_and_battery_status() {
    let s = scenario();
    let (engine, all) = emissions(&s);
    for e in all.iter().filter(|e| e.meter >= 10) {
        let spec = &engine.population().meters[e.meter as usize];
        let bytes = mbus_rsp_ud(spec, 5, 1, e, s.utc_offset_hours).unwrap();
        let frame = decoders::mbus::decode(&bytes).unwrap();
        assert_eq!(
            format!("mbus:SIM{}", frame.meter.id),
            spec.id.as_str(),
            "{frame:?}"
        );
        let litres = Decimal::from(e.register_ml / 1000) / Decimal::from(1000);
        assert_eq!(number(&frame, "volume", 0), litres);
    }
    let low = all.iter().rev().find(|e| e.meter == 12).unwrap();
    assert!(low.status.battery_low);
    let spec = &engine.population().meters[12];
    let header = frames::mbus_header(spec, 1, low).unwrap();
    assert_eq!(header.status, frames::MBUS_STATUS_POWER_LOW);
}

#[test]
fn wmbus_telegrams_decrypt_with_the_per_meter_key() {
    let s = scenario();
    let (engine, all) = emissions(&s);
    let mut keys: HashMap<String, [u8; 16]> = HashMap::new();
    for i in 10..20u32 {
        keys.insert(
            engine.population().meters[i as usize].id.to_string(),
            wmbus_key(s.seed, i),
        );
    }
    let mut cache = wmbus::FormatCache::default();
    for (n, e) in all.iter().filter(|e| e.meter >= 10).enumerate() {
        let spec = &engine.population().meters[e.meter as usize];
        let key = wmbus_key(s.seed, e.meter);
        let bytes = wmbus_telegram(spec, n as u8, Some(key), e, s.utc_offset_hours).unwrap();
        let frame = wmbus::decode(&bytes, &keys, &mut cache).unwrap();
        let litres = Decimal::from(e.register_ml / 1000) / Decimal::from(1000);
        assert_eq!(number(&frame, "volume", 0), litres);
        // Like real OMS meters, the telegram carries the meter's clock (type F, local time,
        // to the minute): the gateway's reading time when the zone is configured.
        let local = frames::meter_local_time(e, s.utc_offset_hours);
        let clock = frame
            .records
            .iter()
            .find(|r| r.quantity == "date_time" && r.storage == 0)
            .expect("date_time record");
        assert_eq!(
            clock.value,
            decoders::RecordValue::Date(
                format!(
                    "{:04}-{:02}-{:02}T{:02}:{:02}",
                    local.year(),
                    u8::from(local.month()),
                    local.day(),
                    local.hour(),
                    local.minute()
                )
                .into()
            )
        );
        // A wrong key is refused, never garbage.
        let wrong: Option<[u8; 16]> = Some(wmbus_key(s.seed + 1, e.meter));
        assert!(wmbus::decode(&bytes, &wrong, &mut wmbus::FormatCache::default()).is_err());
    }
}

#[test]
fn corrupted_frames_fail_to_decode() {
    let s = scenario();
    let (engine, all) = emissions(&s);
    let e = all.iter().find(|e| e.meter == 1).unwrap();
    let spec = &engine.population().meters[1];
    let mut cjt = cjt188_reply(spec, e, 0, 8).unwrap();
    corrupt_checksummed(&mut cjt);
    assert!(decoders::cjt188::decode(&cjt).is_err());

    let e = all.iter().find(|e| e.meter == 15).unwrap();
    let spec = &engine.population().meters[15];
    let mut mbus = mbus_rsp_ud(spec, 1, 0, e, 8).unwrap();
    corrupt_checksummed(&mut mbus);
    assert!(decoders::mbus::decode(&mbus).is_err());

    let key = wmbus_key(s.seed, 15);
    let mut tg = wmbus_telegram(spec, 0, Some(key), e, 8).unwrap();
    corrupt_wmbus(&mut tg, true);
    assert!(wmbus::decode(&tg, &Some(key), &mut wmbus::FormatCache::default()).is_err());
    let mut clear = wmbus_telegram(spec, 0, None, e, 8).unwrap();
    corrupt_wmbus(&mut clear, false);
    assert!(wmbus::decode(&clear, &None, &mut wmbus::FormatCache::default()).is_err());
    assert_eq!(e.delivery, Delivery::Normal);
}
