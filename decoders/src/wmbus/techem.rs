//! Techem proprietary payloads (manufacturer TCH, CI A0–A2): radio water meters (radio 3/4),
//! heat cost allocators (FHKV data III), heat meters (compact V, vario 4) and the status byte of
//! smoke detectors.
//!
//! Layout after the CI, as seen in the corpus: byte 0 status, bytes 1–2 the last due date,
//! bytes 3–4 (heat meters: 3–5) the consumption of the previous period, bytes 5–6 the current
//! date, bytes 7–8 the consumption since the due date. Only the model versions whose layout was
//! checked against reference values are decoded; other Techem payloads stay
//! [`super::WmbusError::ManufacturerSpecific`] rather than risk wrong values.

use model::{Decimal, Unit};

use super::link::Address;
use crate::frame::{Function, Record, RecordValue};

/// Manufacturer code TCH packed as in the M field.
const TCH: u16 = 0x5068;

/// Which Techem model family a telegram comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    /// Radio 3 / radio 4 water meters: volumes in 0.1 m³.
    Water,
    /// FHKV data III heat cost allocators: units plus room and radiator temperatures.
    Hca,
    /// Compact V heat meters: energy in kWh (previous period 24 bit).
    HeatKwh,
    /// Vario 4 heat meters: energy in MJ.
    HeatMj,
    /// Smoke detectors: a status byte (0 = OK, 1 = smoke) and dates only.
    Smoke,
}

fn model(meter: Address) -> Option<Model> {
    if meter.manufacturer != TCH {
        return None;
    }
    Some(match (meter.device_type, meter.version) {
        (0x62, 0x74 | 0x95) => Model::Water,
        (0x80, 0x69 | 0x94) => Model::Hca,
        (0x43, 0x39 | 0x45) => Model::HeatKwh,
        (0xC3, 0x27) => Model::HeatMj,
        (0xF0, 0x76) => Model::Smoke,
        _ => return None,
    })
}

/// Whether this telegram carries a Techem payload this module decodes.
pub(crate) fn is_techem(meter: Address, ci: u8) -> bool {
    (0xA0..=0xA2).contains(&ci) && model(meter).is_some()
}

fn record(
    quantity: crate::frame::RecordQuantity,
    value: Decimal,
    unit: Option<Unit>,
    storage: u32,
) -> Record {
    Record {
        quantity,
        value: RecordValue::Number(value),
        unit,
        storage,
        tariff: 0,
        subunit: 0,
        function: Function::Instantaneous,
    }
}

/// Records of a Techem payload (the bytes after the CI); `None` if too short or not a known
/// model.
pub(crate) fn records(meter: Address, ci: u8, payload: &[u8]) -> Option<Vec<Record>> {
    let le = |from: usize, len: usize| -> Option<i64> {
        let bytes = payload.get(from..from.checked_add(len)?)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0i64, |acc, b| (acc << 8) | i64::from(*b)),
        )
    };
    let model = model(meter)?;
    if model == Model::Smoke {
        let status = *payload.first()?;
        return Some(vec![record(
            crate::frame::q!("status_word"),
            Decimal::from(status),
            Some(Unit::Dimensionless),
            0,
        )]);
    }
    let current = le(7, 2)?;
    Some(match model {
        Model::Water => {
            let previous = le(3, 2)?;
            let m3 = |tenths: i64| Decimal::new(tenths, 1);
            vec![
                record(
                    crate::frame::q!("volume"),
                    m3(previous.checked_add(current)?),
                    Some(Unit::CubicMetre),
                    0,
                ),
                record(
                    crate::frame::q!("volume"),
                    m3(previous),
                    Some(Unit::CubicMetre),
                    1,
                ),
                record(
                    crate::frame::q!("volume_since_due_date"),
                    m3(current),
                    Some(Unit::CubicMetre),
                    0,
                ),
            ]
        }
        Model::Hca => {
            let previous = le(3, 2)?;
            // CI A2 telegrams carry one more status byte before the temperatures.
            let t = if ci == 0xA2 { 10 } else { 9 };
            let room = le(t, 2)?;
            let radiator = le(t.checked_add(2)?, 2)?;
            let celsius = |hundredths: i64| Decimal::new(hundredths, 2);
            vec![
                record(
                    crate::frame::q!("heat_cost_allocation"),
                    Decimal::from(current),
                    None,
                    0,
                ),
                record(
                    crate::frame::q!("heat_cost_allocation"),
                    Decimal::from(previous),
                    None,
                    1,
                ),
                record(
                    crate::frame::q!("room_temperature"),
                    celsius(room),
                    Some(Unit::DegreeCelsius),
                    0,
                ),
                record(
                    crate::frame::q!("radiator_temperature"),
                    celsius(radiator),
                    Some(Unit::DegreeCelsius),
                    0,
                ),
            ]
        }
        Model::HeatKwh => {
            let previous = le(3, 3)?;
            vec![
                record(
                    crate::frame::q!("energy"),
                    Decimal::from(previous.checked_add(current)?),
                    Some(Unit::KilowattHour),
                    0,
                ),
                record(
                    crate::frame::q!("energy"),
                    Decimal::from(previous),
                    Some(Unit::KilowattHour),
                    1,
                ),
                record(
                    crate::frame::q!("energy_since_due_date"),
                    Decimal::from(current),
                    Some(Unit::KilowattHour),
                    0,
                ),
            ]
        }
        Model::Smoke => return None,
        Model::HeatMj => {
            let previous = le(3, 2)?;
            // MJ = GJ with three decimals.
            let gj = |mj: i64| Decimal::new(mj, 3);
            vec![
                record(
                    crate::frame::q!("energy"),
                    gj(previous.checked_add(current)?),
                    Some(Unit::Gigajoule),
                    0,
                ),
                record(
                    crate::frame::q!("energy"),
                    gj(previous),
                    Some(Unit::Gigajoule),
                    1,
                ),
                record(
                    crate::frame::q!("energy_since_due_date"),
                    gj(current),
                    Some(Unit::Gigajoule),
                    0,
                ),
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn techem(device_type: u8, version: u8) -> Address {
        Address {
            manufacturer: TCH,
            id: 0x1234_5678,
            version,
            device_type,
        }
    }

    fn numbers(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| match &r.value {
                RecordValue::Number(d) => format!("{}/{}:{d}", r.quantity, r.storage),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn radio_water_meter_adds_previous_and_current_period() {
        // status, due date, previous 29.1 m³, current date, current 6.9 m³ (synthetic).
        let payload = [0x00, 0x11, 0x22, 0x23, 0x01, 0x33, 0x44, 0x45, 0x00, 0x00];
        let r = records(techem(0x62, 0x74), 0xA2, &payload).unwrap();
        assert_eq!(
            numbers(&r),
            [
                "volume/0:36.0",
                "volume/1:29.1",
                "volume_since_due_date/0:6.9"
            ]
        );
    }

    #[test]
    fn heat_cost_allocator_temperatures_follow_the_ci() {
        // Synthetic: previous 500 units, current 77, room 21.50 °C, radiator 40.00 °C.
        let a0 = [
            0x00, 0x11, 0x22, 0xF4, 0x01, 0x33, 0x44, 0x4D, 0x00, 0x66, 0x08, 0xA0, 0x0F,
        ];
        let r = records(techem(0x80, 0x69), 0xA0, &a0).unwrap();
        assert_eq!(
            numbers(&r),
            [
                "heat_cost_allocation/0:77",
                "heat_cost_allocation/1:500",
                "room_temperature/0:21.50",
                "radiator_temperature/0:40.00"
            ]
        );
        // CI A2 has one more byte before the temperatures.
        let mut a2 = a0.to_vec();
        a2.insert(9, 0xEE);
        assert_eq!(records(techem(0x80, 0x94), 0xA2, &a2).unwrap(), r);
        assert!(records(techem(0x80, 0x69), 0xA0, &a0[..10]).is_none());
    }

    #[test]
    fn smoke_detector_reports_its_status_byte() {
        let r = records(techem(0xF0, 0x76), 0xA0, &[0x01, 0x11]).unwrap();
        assert_eq!(numbers(&r), ["status_word/0:1"]);
    }

    #[test]
    fn unknown_models_are_not_guessed() {
        assert!(!is_techem(techem(0x72, 0x50), 0xA2));
        assert!(!is_techem(techem(0x62, 0x74), 0x7A));
        assert!(records(techem(0x62, 0x01), 0xA2, &[0; 16]).is_none());
    }
}
