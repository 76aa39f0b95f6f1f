//! VIF meanings (EN 13757-3 table 10 and the FB/FD extension tables), built into static tables at compile time.

use super::*;

/// What a VIF (with extension) means: quantity name, unit and decimal exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VifInfo {
    /// Quantity, snake_case (`volume`, `energy`, `error_flags`...).
    pub quantity: &'static str,
    /// Unit of the scaled value; `None` for plain numbers.
    pub unit: Option<Unit>,
    /// Power of ten applied to the raw value.
    pub exponent: i32,
    /// Extra factor (minutes → seconds = 60, m³/min → m³/h = 60), 1 otherwise.
    pub factor: u32,
    /// The value is a date/time (VIF 6C/6D, FD 30/70).
    pub date: bool,
    /// [`RecordQuantity::known_index`] of `quantity`: the table stays `Copy` (a
    /// `RecordQuantity` in it made every lookup a clone and a drop, 20 % of the record
    /// iterator's time) and the record's quantity is still no search.
    pub(super) known: u8,
}

pub(super) const fn vi(quantity: &'static str, unit: Option<Unit>, exponent: i32) -> VifInfo {
    VifInfo {
        quantity,
        known: RecordQuantity::known_index(quantity),
        unit,
        exponent,
        factor: 1,
        date: false,
    }
}

/// A date or date-time VIF (the value is read as a date type).
pub(super) const fn dated(quantity: &'static str) -> VifInfo {
    VifInfo {
        quantity,
        known: RecordQuantity::known_index(quantity),
        unit: None,
        exponent: 0,
        factor: 1,
        date: true,
    }
}

pub(super) const fn vf(
    quantity: &'static str,
    unit: Option<Unit>,
    exponent: i32,
    factor: u32,
) -> VifInfo {
    VifInfo {
        quantity,
        known: RecordQuantity::known_index(quantity),
        unit,
        exponent,
        factor,
        date: false,
    }
}

/// Duration codes nn: 0 s, 1 min, 2 h, 3 d.
pub(super) const fn duration(quantity: &'static str, nn: u8) -> VifInfo {
    match nn & 3 {
        0 => vi(quantity, Some(Unit::Second), 0),
        1 => vf(quantity, Some(Unit::Second), 0, 60),
        2 => vi(quantity, Some(Unit::Hour), 0),
        _ => vi(quantity, Some(Unit::Day), 0),
    }
}

pub(super) const fn exp(vif: u8, mask: u8, offset: i32) -> i32 {
    // `as` because `From` is not const; a u8 always fits an i32.
    ((vif & mask) as i32).wrapping_add(offset)
}

/// Primary VIF table (EN 13757-3 table 10), VIF without the extension bit.
pub(super) const fn primary_vif(vif: u8) -> VifInfo {
    use Unit as U;
    match vif {
        0x00..=0x07 => vi("energy", Some(U::KilowattHour), exp(vif, 7, -6)),
        0x08..=0x0F => vi("energy", Some(U::Joule), exp(vif, 7, 0)),
        0x10..=0x17 => vi("volume", Some(U::CubicMetre), exp(vif, 7, -6)),
        0x18..=0x1F => vi("mass_kg", None, exp(vif, 7, -3)),
        0x20..=0x23 => duration("on_time", vif),
        0x24..=0x27 => duration("operating_time", vif),
        0x28..=0x2F => vi("power", Some(U::Watt), exp(vif, 7, -3)),
        0x30..=0x37 => vi("power_j_per_h", None, exp(vif, 7, 0)),
        0x38..=0x3F => vi("volume_flow", Some(U::CubicMetrePerHour), exp(vif, 7, -6)),
        0x40..=0x47 => vf(
            "volume_flow",
            Some(U::CubicMetrePerHour),
            exp(vif, 7, -7),
            60,
        ),
        0x48..=0x4F => vi("volume_flow", Some(U::CubicMetrePerSecond), exp(vif, 7, -9)),
        0x50..=0x57 => vi("mass_flow_kg_per_h", None, exp(vif, 7, -3)),
        0x58..=0x5B => vi("flow_temperature", Some(U::DegreeCelsius), exp(vif, 3, -3)),
        0x5C..=0x5F => vi(
            "return_temperature",
            Some(U::DegreeCelsius),
            exp(vif, 3, -3),
        ),
        0x60..=0x63 => vi("temperature_difference", Some(U::Kelvin), exp(vif, 3, -3)),
        0x64..=0x67 => vi(
            "external_temperature",
            Some(U::DegreeCelsius),
            exp(vif, 3, -3),
        ),
        0x68..=0x6B => vi("pressure", Some(U::Bar), exp(vif, 3, -3)),
        0x6C => dated("date"),
        0x6D => dated("date_time"),
        0x6E => vi("hca", None, 0),
        0x70..=0x73 => duration("averaging_duration", vif),
        0x74..=0x77 => duration("actuality_duration", vif),
        0x78 => vi("fabrication_no", None, 0),
        0x79 => vi("enhanced_identification", None, 0),
        0x7A => vi("bus_address", None, 0),
        0x7E => vi("any_vif", None, 0),
        0x7F => vi("manufacturer_specific", None, 0),
        _ => vi("reserved", None, 0),
    }
}

/// First extension table, after VIF FD (EN 13757-3 table 14).
pub(super) const fn fd_vif(code: u8) -> VifInfo {
    use Unit as U;
    match code {
        0x00..=0x03 => vi("credit", None, exp(code, 3, -3)),
        0x04..=0x07 => vi("debit", None, exp(code, 3, -3)),
        0x08 => vi("access_number", None, 0),
        0x09 => vi("medium", None, 0),
        0x0A => vi("manufacturer", None, 0),
        0x0B => vi("parameter_set_id", None, 0),
        0x0C => vi("model_version", None, 0),
        0x0D => vi("hardware_version", None, 0),
        0x0E => vi("firmware_version", None, 0),
        0x0F => vi("software_version", None, 0),
        0x10 => vi("customer_location", None, 0),
        0x11 => vi("customer", None, 0),
        0x12 => vi("access_code_user", None, 0),
        0x13 => vi("access_code_operator", None, 0),
        0x14 => vi("access_code_system_operator", None, 0),
        0x15 => vi("access_code_developer", None, 0),
        0x16 => vi("password", None, 0),
        0x17 => vi("error_flags", None, 0),
        0x18 => vi("error_mask", None, 0),
        0x1A => vi("digital_output", None, 0),
        0x1B => vi("digital_input", None, 0),
        0x1C => vi("baud_rate", None, 0),
        0x1D => vi("response_delay_bit_times", None, 0),
        0x1E => vi("retry", None, 0),
        0x20 => vi("first_storage_cyclic", None, 0),
        0x21 => vi("last_storage_cyclic", None, 0),
        0x22 => vi("storage_block_size", None, 0),
        0x24..=0x27 => duration("storage_interval", code),
        0x28 => vi("storage_interval_months", None, 0),
        0x29 => vi("storage_interval_years", None, 0),
        0x2C..=0x2F => duration("duration_since_readout", code),
        0x30 => dated("tariff_start"),
        0x31..=0x33 => duration("tariff_duration", code),
        0x34..=0x37 => duration("tariff_period", code),
        0x38 => vi("tariff_period_months", None, 0),
        0x39 => vi("tariff_period_years", None, 0),
        0x3A => vi("dimensionless", None, 0),
        0x40..=0x4F => vi("voltage", Some(U::Volt), exp(code, 0x0F, -9)),
        0x50..=0x5F => vi("current_a", None, exp(code, 0x0F, -12)),
        0x60 => vi("reset_counter", None, 0),
        0x61 => vi("cumulation_counter", None, 0),
        0x62 => vi("control_signal", None, 0),
        0x63 => vi("day_of_week", None, 0),
        0x64 => vi("week_number", None, 0),
        0x65 => vi("day_change_time_point", None, 0),
        0x66 => vi("parameter_activation_state", None, 0),
        0x67 => vi("special_supplier_information", None, 0),
        0x68 => vi("duration_since_cumulation", Some(U::Hour), 0),
        0x69 => vi("duration_since_cumulation", Some(U::Day), 0),
        0x6A => vi("duration_since_cumulation_months", None, 0),
        0x6B => vi("duration_since_cumulation_years", None, 0),
        0x6C => vi("battery_operating_time", Some(U::Hour), 0),
        0x6D => vi("battery_operating_time", Some(U::Day), 0),
        0x6E => vi("battery_operating_time_months", None, 0),
        0x6F => vi("battery_operating_time_years", None, 0),
        0x70 => dated("battery_change_date"),
        0x71 => vi("rf_level", Some(U::Dbm), 0),
        0x72 => vi("daylight_saving", None, 0),
        0x73 => vi("listening_window", None, 0),
        0x74 => vi("remaining_battery", Some(U::Day), 0),
        0x75 => vi("meter_stopped_count", None, 0),
        0x76 => vi("manufacturer_container", None, 0),
        _ => vi("reserved", None, 0),
    }
}

/// Second extension table, after VIF FB (EN 13757-3 table 12).
pub(super) const fn fb_vif(code: u8) -> VifInfo {
    use Unit as U;
    match code {
        0x00..=0x01 => vi("energy", Some(U::MegawattHour), exp(code, 1, -1)),
        0x08..=0x09 => vi("energy", Some(U::Gigajoule), exp(code, 1, -1)),
        // Units without a `model::Unit` keep the unit in the quantity name (as `mass_kg`).
        0x02..=0x03 => vi("reactive_energy_kvarh", None, exp(code, 1, 0)),
        0x04..=0x05 => vi("apparent_energy_kvah", None, exp(code, 1, 0)),
        0x10..=0x11 => vi("volume", Some(U::CubicMetre), exp(code, 1, 2)),
        0x14..=0x17 => vi("reactive_power_kvar", None, exp(code, 3, -3)),
        0x18..=0x19 => vi("mass_kg", None, exp(code, 1, 5)),
        0x1A..=0x1B => vi("relative_humidity", Some(U::Percent), exp(code, 1, -1)),
        0x20 => vi("volume_ft3", None, 0),
        0x21 => vi("volume_ft3", None, -1),
        0x28..=0x29 => vi("power", Some(U::Kilowatt), exp(code, 1, 2)),
        0x2A => vi("phase_u_u", Some(U::Degree), -1),
        0x2B => vi("phase_u_i", Some(U::Degree), -1),
        0x2C..=0x2F => vi("frequency_hz", None, exp(code, 3, -3)),
        0x30..=0x31 => vi("power_gj_per_h", None, exp(code, 1, -1)),
        0x34..=0x37 => vi("apparent_power_kva", None, exp(code, 3, -3)),
        0x58..=0x5B => vi("flow_temperature_f", None, exp(code, 3, -3)),
        0x5C..=0x5F => vi("return_temperature_f", None, exp(code, 3, -3)),
        0x60..=0x63 => vi("temperature_difference_f", None, exp(code, 3, -3)),
        0x64..=0x67 => vi("external_temperature_f", None, exp(code, 3, -3)),
        0x70..=0x73 => vi("cold_warm_temperature_limit_f", None, exp(code, 3, -3)),
        0x74..=0x77 => vi(
            "cold_warm_temperature_limit",
            Some(U::DegreeCelsius),
            exp(code, 3, -3),
        ),
        0x78..=0x7F => vi("cumulative_max_power", Some(U::Watt), exp(code, 7, -3)),
        _ => vi("reserved", None, 0),
    }
}

/// The three VIF tables indexed by code (VIF or extension code without the extension bit),
/// computed at build time: a record costs one indexed load instead of a chain of range tests.
pub(super) static PRIMARY_VIF: [VifInfo; 128] = vif_table(VifTable::Primary);
pub(super) static FD_VIF: [VifInfo; 128] = vif_table(VifTable::Fd);
pub(super) static FB_VIF: [VifInfo; 128] = vif_table(VifTable::Fb);

#[derive(Clone, Copy)]
pub(super) enum VifTable {
    Primary,
    Fd,
    Fb,
}

// Only evaluated at compile time (the statics above): an index out of range or an overflow
// would fail the build, not panic at run time.
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
pub(super) const fn vif_table(which: VifTable) -> [VifInfo; 128] {
    let mut table = [vi("reserved", None, 0); 128];
    let mut code = 0u8;
    while code < 128 {
        let info = match which {
            VifTable::Primary => primary_vif(code),
            VifTable::Fd => fd_vif(code),
            VifTable::Fb => fb_vif(code),
        };
        table[code as usize] = info;
        code += 1;
    }
    table
}

/// The entry for `code` (extension bit ignored) of a VIF table, by reference.
#[inline(always)]
pub(super) fn table_entry(table: &'static [VifInfo; 128], code: u8) -> &'static VifInfo {
    table.get(usize::from(code & 0x7F)).unwrap_or(&RESERVED)
}

/// The meaning of a plain-text VIF.
pub(super) static PLAIN_TEXT: VifInfo = vi("plain_text", None, 0);
/// The meaning of a DIF 1F record.
pub(super) static MORE_RECORDS_FOLLOW: VifInfo = vi("more_records_follow", None, 0);
/// The meaning of a DIF 0F record.
pub(super) static MANUFACTURER_SPECIFIC: VifInfo = vi("manufacturer_specific", None, 0);
/// `table_entry`'s fallback (never used: the tables have 128 entries).
static RESERVED: VifInfo = vi("reserved", None, 0);
