//! Consumption model: diurnal household and commercial demand, weekends and seasonality.
//!
//! Everything here is a pure function of (seed, meter index, time step) so a run is
//! reproducible and any hour of any meter can be computed without replaying the past.
//! Floats are fine here: they shape demand; registers themselves are integer millilitres
//! (see [`crate::engine`]).

use serde::{Deserialize, Serialize};

/// Kind of customer, which decides the daily shape and size of demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// A household: morning and evening peaks, near-zero night use, a bit more at weekends.
    Household,
    /// A shop or office: use during opening hours on weekdays, little at weekends.
    Commercial,
}

/// Household share of daily use per local hour (normalised at use; shape from typical
/// residential end-use studies: 07–08 and 19–21 peaks, 01–05 trough).
const HOUSEHOLD_HOURLY: [f64; 24] = [
    0.012, 0.006, 0.004, 0.004, 0.006, 0.015, 0.040, 0.080, 0.072, 0.055, 0.045, 0.045, 0.052,
    0.045, 0.035, 0.033, 0.038, 0.048, 0.062, 0.075, 0.070, 0.060, 0.042, 0.025,
];

/// Commercial share of daily use per local hour: opening hours 08–19.
const COMMERCIAL_HOURLY: [f64; 24] = [
    0.005, 0.004, 0.004, 0.004, 0.004, 0.006, 0.015, 0.040, 0.085, 0.095, 0.095, 0.095, 0.090,
    0.090, 0.090, 0.090, 0.085, 0.070, 0.040, 0.020, 0.012, 0.008, 0.006, 0.005,
];

/// Probability that a household uses no water at all in a given local hour; night hours are
/// mostly zero, which is what lets leak detectors see "no return to zero flow".
const HOUSEHOLD_ZERO: [f64; 24] = [
    0.75, 0.85, 0.9, 0.9, 0.85, 0.6, 0.25, 0.1, 0.1, 0.2, 0.25, 0.25, 0.2, 0.25, 0.3, 0.3, 0.3,
    0.2, 0.15, 0.1, 0.1, 0.15, 0.3, 0.55,
];

/// Probability of zero use in a commercial hour (closed at night).
const COMMERCIAL_ZERO: [f64; 24] = [
    0.9, 0.95, 0.95, 0.95, 0.95, 0.9, 0.6, 0.2, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05,
    0.05, 0.1, 0.3, 0.6, 0.75, 0.8, 0.85, 0.9,
];

impl Profile {
    fn hourly(self) -> &'static [f64; 24] {
        match self {
            Self::Household => &HOUSEHOLD_HOURLY,
            Self::Commercial => &COMMERCIAL_HOURLY,
        }
    }

    fn zero(self) -> &'static [f64; 24] {
        match self {
            Self::Household => &HOUSEHOLD_ZERO,
            Self::Commercial => &COMMERCIAL_ZERO,
        }
    }

    /// Returns the multiplier for a weekend day (households stay home, shops close).
    pub fn weekend_factor(self) -> f64 {
        match self {
            Self::Household => 1.12,
            Self::Commercial => 0.35,
        }
    }

    /// Returns the range of mean daily use in litres a meter of this profile draws from.
    pub fn daily_litres_range(self) -> (f64, f64) {
        match self {
            Self::Household => (220.0, 700.0),
            Self::Commercial => (1_500.0, 12_000.0),
        }
    }
}

/// Seasonal multiplier for a day of the year (1..=366): +20 % in mid-July, −20 % in January.
pub fn season_factor(day_of_year: u16) -> f64 {
    let phase = (f64::from(day_of_year) - 196.0) / 365.25 * std::f64::consts::TAU;
    1.0 + 0.2 * phase.cos()
}

/// Per-step factors shared by every meter of a profile (computed once per simulated hour).
#[derive(Debug, Clone, Copy)]
pub struct HourFactors {
    /// Expected litres per (daily litre) in this hour when the hour is not a zero hour.
    pub per_daily_litre: f64,
    /// Probability that the hour has no use.
    pub zero_probability: f64,
}

impl HourFactors {
    /// Computes the factors of `profile` for a local hour, weekday flag and day of year,
    /// scaled to a step of `step_hours` hours.
    pub fn new(profile: Profile, local_hour: u8, weekend: bool, day_of_year: u16) -> Self {
        let hourly = profile.hourly();
        let total: f64 = hourly.iter().sum();
        let h = usize::from(local_hour % 24);
        let share = hourly.get(h).copied().unwrap_or(0.0) / total;
        let zero = profile.zero().get(h).copied().unwrap_or(0.0);
        let weekend = if weekend {
            profile.weekend_factor()
        } else {
            1.0
        };
        // Divide by (1 - zero) so the expected value over many days keeps the hourly share.
        let per_daily_litre = share * weekend * season_factor(day_of_year) / (1.0 - zero);
        Self {
            per_daily_litre,
            zero_probability: zero,
        }
    }

    /// Returns the litres used in the hour by a meter with mean daily use `daily_litres`,
    /// given two uniform draws in [0, 1).
    pub fn litres(&self, daily_litres: f64, u_zero: f64, u_amount: f64) -> f64 {
        if u_zero < self.zero_probability {
            0.0
        } else {
            // Uniform 0.4..1.6: mean 1, enough spread to look like real hourly data.
            daily_litres * self.per_daily_litre * (0.4 + 1.2 * u_amount)
        }
    }
}

/// SplitMix64: a tiny, fast, well-mixed hash used as a counter-based random generator so
/// every (seed, meter, step) has its own reproducible draw.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Returns a uniform draw in [0, 1) for the triple (seed, a, b).
pub fn unit(seed: u64, a: u64, b: u64) -> f64 {
    let h = mix(seed ^ mix(a ^ mix(b)));
    // 53 significant bits → exact in an f64.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn household_mean_daily_use_matches_parameter() {
        // Average over many simulated weekday hours at the equinox (season ≈ 1).
        let days = 2000u64;
        let mut total = 0.0;
        for d in 0..days {
            for h in 0..24u8 {
                let f = HourFactors::new(Profile::Household, h, false, 105);
                total += f.litres(400.0, unit(1, d, u64::from(h)), unit(2, d, u64::from(h)));
            }
        }
        let mean = total / days as f64;
        let season = season_factor(105);
        assert!(
            (mean / season - 400.0).abs() < 12.0,
            "mean daily use {mean} (season {season})"
        );
    }

    #[test]
    fn night_is_quieter_than_evening_and_commercial_weekend_is_low() {
        let night = HourFactors::new(Profile::Household, 3, false, 100);
        let evening = HourFactors::new(Profile::Household, 19, false, 100);
        assert!(night.zero_probability > 0.8);
        assert!(
            evening.per_daily_litre * (1.0 - evening.zero_probability)
                > 5.0 * night.per_daily_litre * (1.0 - night.zero_probability)
        );
        let weekday = HourFactors::new(Profile::Commercial, 11, false, 100);
        let weekend = HourFactors::new(Profile::Commercial, 11, true, 100);
        assert!(weekend.per_daily_litre < 0.5 * weekday.per_daily_litre);
    }

    #[test]
    fn summer_uses_more_than_winter() {
        assert!(season_factor(196) > 1.19);
        assert!(season_factor(15) < 0.82);
    }

    #[test]
    fn draws_are_deterministic_and_in_range() {
        assert_eq!(unit(7, 1, 2), unit(7, 1, 2));
        assert_ne!(unit(7, 1, 2), unit(7, 1, 3));
        for i in 0..10_000 {
            let u = unit(3, i, 9);
            assert!((0.0..1.0).contains(&u));
        }
    }
}
