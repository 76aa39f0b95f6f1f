//! Physical quantities and units, with exact conversions to each dimension's base unit.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// What a reading measures. The billable register is [`Quantity::Volume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantity {
    /// Cumulative forward volume register (the billing register).
    Volume,
    /// Cumulative reverse volume register.
    VolumeReverse,
    /// Net volume register (forward − reverse) as reported by the device.
    VolumeNet,
    /// Volume at the last settlement (billing) date, as stored by the meter.
    VolumeSettlement,
    /// Instantaneous volume flow.
    Flow,
    /// Water pressure.
    Pressure,
    /// Medium or flow temperature.
    Temperature,
    /// Return temperature (heat meters).
    ReturnTemperature,
    /// Cumulative thermal energy.
    Energy,
    /// Instantaneous thermal power.
    Power,
    /// Level (tank, reservoir).
    Level,
    /// Battery voltage.
    BatteryVoltage,
    /// Remaining battery, percent.
    BatteryPercent,
    /// Cumulative operating time.
    OperatingTime,
    /// NB-IoT reference signal received power (dBm).
    SignalRsrp,
    /// NB-IoT signal to interference plus noise ratio (dB).
    SignalSinr,
    /// NB-IoT coverage enhancement level (0, 1, 2).
    SignalEcl,
    /// Valve position: 0 open, 1 closed, 3 abnormal (CJ/T 188 ST D1D0).
    ValveState,
    /// Raw device status word, for audit and vendor-specific bits.
    StatusWord,
    /// Hydrant tilt angle.
    Tilt,
    /// Hydrant outlet state: 0 closed, 1 open.
    OutletState,
}

impl Quantity {
    /// Returns the snake_case name used in JSON and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Volume => "volume",
            Self::VolumeReverse => "volume_reverse",
            Self::VolumeNet => "volume_net",
            Self::VolumeSettlement => "volume_settlement",
            Self::Flow => "flow",
            Self::Pressure => "pressure",
            Self::Temperature => "temperature",
            Self::ReturnTemperature => "return_temperature",
            Self::Energy => "energy",
            Self::Power => "power",
            Self::Level => "level",
            Self::BatteryVoltage => "battery_voltage",
            Self::BatteryPercent => "battery_percent",
            Self::OperatingTime => "operating_time",
            Self::SignalRsrp => "signal_rsrp",
            Self::SignalSinr => "signal_sinr",
            Self::SignalEcl => "signal_ecl",
            Self::ValveState => "valve_state",
            Self::StatusWord => "status_word",
            Self::Tilt => "tilt",
            Self::OutletState => "outlet_state",
        }
    }

    /// Returns every quantity, in declaration order.
    pub const ALL: [Quantity; 21] = [
        Self::Volume,
        Self::VolumeReverse,
        Self::VolumeNet,
        Self::VolumeSettlement,
        Self::Flow,
        Self::Pressure,
        Self::Temperature,
        Self::ReturnTemperature,
        Self::Energy,
        Self::Power,
        Self::Level,
        Self::BatteryVoltage,
        Self::BatteryPercent,
        Self::OperatingTime,
        Self::SignalRsrp,
        Self::SignalSinr,
        Self::SignalEcl,
        Self::ValveState,
        Self::StatusWord,
        Self::Tilt,
        Self::OutletState,
    ];

    /// Returns true for cumulative registers (the ones VEE checks for monotonicity).
    pub fn is_cumulative(self) -> bool {
        matches!(
            self,
            Self::Volume | Self::VolumeReverse | Self::Energy | Self::OperatingTime
        )
    }
}

impl std::str::FromStr for Quantity {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|q| q.as_str() == s)
            .ok_or_else(|| UnitError::UnknownQuantity(s.to_owned()))
    }
}

/// A unit of measurement. Each unit belongs to one dimension with one base unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Unit {
    /// Cubic metre (base unit of volume).
    #[serde(rename = "m3")]
    CubicMetre,
    /// Litre.
    #[serde(rename = "L")]
    Litre,
    /// Cubic metre per hour (base unit of flow).
    #[serde(rename = "m3/h")]
    CubicMetrePerHour,
    /// Litre per hour.
    #[serde(rename = "L/h")]
    LitrePerHour,
    /// Cubic metre per second.
    #[serde(rename = "m3/s")]
    CubicMetrePerSecond,
    /// Degree Celsius (base unit of temperature).
    #[serde(rename = "degC")]
    DegreeCelsius,
    /// Kelvin, as a temperature difference.
    #[serde(rename = "K")]
    Kelvin,
    /// Bar (base unit of pressure).
    #[serde(rename = "bar")]
    Bar,
    /// Megapascal.
    #[serde(rename = "MPa")]
    Megapascal,
    /// Kilopascal.
    #[serde(rename = "kPa")]
    Kilopascal,
    /// Watt-hour.
    #[serde(rename = "Wh")]
    WattHour,
    /// Kilowatt-hour (base unit of energy).
    #[serde(rename = "kWh")]
    KilowattHour,
    /// Megawatt-hour.
    #[serde(rename = "MWh")]
    MegawattHour,
    /// Joule.
    #[serde(rename = "J")]
    Joule,
    /// Gigajoule.
    #[serde(rename = "GJ")]
    Gigajoule,
    /// Watt.
    #[serde(rename = "W")]
    Watt,
    /// Kilowatt (base unit of power).
    #[serde(rename = "kW")]
    Kilowatt,
    /// Volt (base unit of voltage).
    #[serde(rename = "V")]
    Volt,
    /// Percent (base unit of ratios).
    #[serde(rename = "%")]
    Percent,
    /// Second.
    #[serde(rename = "s")]
    Second,
    /// Hour (base unit of durations).
    #[serde(rename = "h")]
    Hour,
    /// Day.
    #[serde(rename = "d")]
    Day,
    /// Metre (base unit of length / level).
    #[serde(rename = "m")]
    Metre,
    /// Degree of angle.
    #[serde(rename = "deg")]
    Degree,
    /// dBm (absolute radio power).
    #[serde(rename = "dBm")]
    Dbm,
    /// dB (radio ratio).
    #[serde(rename = "dB")]
    Decibel,
    /// A dimensionless number or code (states, status words, levels).
    #[serde(rename = "1")]
    Dimensionless,
}

/// Why a unit or quantity could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The unit symbol is unknown.
    #[error("unknown unit {0:?}")]
    UnknownUnit(String),
    /// The quantity name is unknown.
    #[error("unknown quantity {0:?}")]
    UnknownQuantity(String),
    /// The two units measure different things.
    #[error("cannot convert {from} to {to}: different dimensions")]
    Incompatible {
        /// Source unit symbol.
        from: &'static str,
        /// Target unit symbol.
        to: &'static str,
    },
}

impl Unit {
    /// Every unit, for lookups by symbol.
    const ALL: [Unit; 27] = [
        Self::CubicMetre,
        Self::Litre,
        Self::CubicMetrePerHour,
        Self::LitrePerHour,
        Self::CubicMetrePerSecond,
        Self::DegreeCelsius,
        Self::Kelvin,
        Self::Bar,
        Self::Megapascal,
        Self::Kilopascal,
        Self::WattHour,
        Self::KilowattHour,
        Self::MegawattHour,
        Self::Joule,
        Self::Gigajoule,
        Self::Watt,
        Self::Kilowatt,
        Self::Volt,
        Self::Percent,
        Self::Second,
        Self::Hour,
        Self::Day,
        Self::Metre,
        Self::Degree,
        Self::Dbm,
        Self::Decibel,
        Self::Dimensionless,
    ];

    /// Returns the symbol used in JSON and in the database (`m3`, `L`, `m3/h`, `degC`...).
    pub fn symbol(self) -> &'static str {
        match self {
            Self::CubicMetre => "m3",
            Self::Litre => "L",
            Self::CubicMetrePerHour => "m3/h",
            Self::LitrePerHour => "L/h",
            Self::CubicMetrePerSecond => "m3/s",
            Self::DegreeCelsius => "degC",
            Self::Kelvin => "K",
            Self::Bar => "bar",
            Self::Megapascal => "MPa",
            Self::Kilopascal => "kPa",
            Self::WattHour => "Wh",
            Self::KilowattHour => "kWh",
            Self::MegawattHour => "MWh",
            Self::Joule => "J",
            Self::Gigajoule => "GJ",
            Self::Watt => "W",
            Self::Kilowatt => "kW",
            Self::Volt => "V",
            Self::Percent => "%",
            Self::Second => "s",
            Self::Hour => "h",
            Self::Day => "d",
            Self::Metre => "m",
            Self::Degree => "deg",
            Self::Dbm => "dBm",
            Self::Decibel => "dB",
            Self::Dimensionless => "1",
        }
    }

    /// Returns the base unit of this unit's dimension and the exact factor to reach it
    /// (`value_in_base = value × factor`).
    pub fn base(self) -> (Unit, Decimal) {
        let d = |mantissa: i64, scale: u32| Decimal::new(mantissa, scale);
        match self {
            Self::CubicMetre => (Self::CubicMetre, Decimal::ONE),
            Self::Litre => (Self::CubicMetre, d(1, 3)),
            Self::CubicMetrePerHour => (Self::CubicMetrePerHour, Decimal::ONE),
            Self::LitrePerHour => (Self::CubicMetrePerHour, d(1, 3)),
            Self::CubicMetrePerSecond => (Self::CubicMetrePerHour, d(3600, 0)),
            Self::DegreeCelsius => (Self::DegreeCelsius, Decimal::ONE),
            Self::Kelvin => (Self::Kelvin, Decimal::ONE),
            Self::Bar => (Self::Bar, Decimal::ONE),
            Self::Megapascal => (Self::Bar, d(10, 0)),
            Self::Kilopascal => (Self::Bar, d(1, 2)),
            Self::WattHour => (Self::KilowattHour, d(1, 3)),
            Self::KilowattHour => (Self::KilowattHour, Decimal::ONE),
            Self::MegawattHour => (Self::KilowattHour, d(1000, 0)),
            // 1 kWh = 3.6 MJ, so 1 J = 1/3 600 000 kWh: not a finite decimal; keep joules in
            // their own dimension rather than round on conversion.
            Self::Joule => (Self::Joule, Decimal::ONE),
            Self::Gigajoule => (Self::Joule, d(1_000_000_000, 0)),
            Self::Watt => (Self::Kilowatt, d(1, 3)),
            Self::Kilowatt => (Self::Kilowatt, Decimal::ONE),
            Self::Volt => (Self::Volt, Decimal::ONE),
            Self::Percent => (Self::Percent, Decimal::ONE),
            Self::Second => (Self::Hour, Decimal::ONE / d(3600, 0)),
            Self::Hour => (Self::Hour, Decimal::ONE),
            Self::Day => (Self::Hour, d(24, 0)),
            Self::Metre => (Self::Metre, Decimal::ONE),
            Self::Degree => (Self::Degree, Decimal::ONE),
            Self::Dbm => (Self::Dbm, Decimal::ONE),
            Self::Decibel => (Self::Decibel, Decimal::ONE),
            Self::Dimensionless => (Self::Dimensionless, Decimal::ONE),
        }
    }

    /// Converts `value` in this unit to `target`.
    ///
    /// # Errors
    /// Returns [`UnitError::Incompatible`] when the units measure different things.
    pub fn convert(self, value: Decimal, target: Unit) -> Result<Decimal, UnitError> {
        let (from_base, from_factor) = self.base();
        let (to_base, to_factor) = target.base();
        if from_base != to_base {
            return Err(UnitError::Incompatible {
                from: self.symbol(),
                to: target.symbol(),
            });
        }
        if self == target {
            return Ok(value);
        }
        Ok(value * from_factor / to_factor)
    }

    /// Converts `value` to the base unit of its dimension (m3, m3/h, degC, bar, kWh, ...).
    pub fn to_base(self, value: Decimal) -> (Unit, Decimal) {
        let (base, factor) = self.base();
        (base, value * factor)
    }
}

impl std::str::FromStr for Unit {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|u| u.symbol() == s)
            .ok_or_else(|| UnitError::UnknownUnit(s.to_owned()))
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.symbol())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn litres_to_cubic_metres_is_exact() {
        assert_eq!(
            Unit::Litre.convert(dec!(1234.5), Unit::CubicMetre),
            Ok(dec!(1.2345))
        );
        assert_eq!(
            Unit::CubicMetre.convert(dec!(1.2345), Unit::Litre),
            Ok(dec!(1234.5))
        );
    }

    #[test]
    fn pressure_and_flow_conversions() {
        assert_eq!(
            Unit::Megapascal.convert(dec!(0.35), Unit::Bar),
            Ok(dec!(3.5))
        );
        assert_eq!(
            Unit::Kilopascal.convert(dec!(150), Unit::Bar),
            Ok(dec!(1.5))
        );
        assert_eq!(
            Unit::CubicMetrePerSecond.convert(dec!(0.001), Unit::CubicMetrePerHour),
            Ok(dec!(3.6))
        );
        assert_eq!(
            Unit::MegawattHour.to_base(dec!(0.02)),
            (Unit::KilowattHour, dec!(20))
        );
    }

    #[test]
    fn incompatible_units_are_refused() {
        assert_eq!(
            Unit::Litre.convert(Decimal::ONE, Unit::Bar),
            Err(UnitError::Incompatible {
                from: "L",
                to: "bar"
            })
        );
    }

    #[test]
    fn symbols_round_trip() {
        for u in Unit::ALL {
            assert_eq!(u.symbol().parse::<Unit>(), Ok(u));
            let json = serde_json::to_string(&u).unwrap();
            assert_eq!(json, format!("\"{}\"", u.symbol()));
        }
        for q in Quantity::ALL {
            assert_eq!(q.as_str().parse::<Quantity>(), Ok(q));
            assert_eq!(
                serde_json::to_string(&q).unwrap(),
                format!("\"{}\"", q.as_str())
            );
        }
    }
}
