//! Working days and hours of the arrears rule, from a data file (`pipeline/calendars/cn.toml`):
//! public holidays and the official swapped working days (调休) are data, not code.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use time::{Date, OffsetDateTime, Time, UtcOffset, Weekday};

use super::ControlError;

/// The calendar file shipped with the pipeline (mainland China).
pub const DEFAULT_CALENDAR: &str = include_str!("../../calendars/cn.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalendarFile {
    utc_offset: String,
    work_start: String,
    work_end: String,
    #[serde(default)]
    holidays: Vec<String>,
    #[serde(default)]
    working_days: Vec<String>,
}

/// Why an instant is not working time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffReason {
    /// A listed public holiday.
    Holiday,
    /// Saturday or Sunday and not a swapped working day.
    Weekend,
    /// Outside working hours of a working day (night-time).
    OutsideHours,
}

impl OffReason {
    /// A short explanation stored with a deferred decision.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Holiday => "public holiday",
            Self::Weekend => "weekend (not a swapped working day)",
            Self::OutsideHours => "outside working hours",
        }
    }
}

/// A working-day calendar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    offset: UtcOffset,
    start: Time,
    end: Time,
    holidays: BTreeSet<Date>,
    working_days: BTreeSet<Date>,
}

impl Calendar {
    /// Parses a calendar; `origin` names the file in errors.
    ///
    /// # Errors
    /// [`ControlError::Calendar`] naming the bad field or date.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ControlError> {
        let bad = |why: String| ControlError::Calendar {
            path: origin.to_owned(),
            why,
        };
        let f: CalendarFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let offset = UtcOffset::parse(
            &f.utc_offset,
            time::macros::format_description!("[offset_hour sign:mandatory]:[offset_minute]"),
        )
        .map_err(|e| {
            bad(format!(
                "utc_offset {:?}: expected like +08:00 ({e})",
                f.utc_offset
            ))
        })?;
        let hm = |field: &str, s: &str| {
            Time::parse(s, time::macros::format_description!("[hour]:[minute]"))
                .map_err(|e| bad(format!("{field} {s:?}: expected HH:MM ({e})")))
        };
        let start = hm("work_start", &f.work_start)?;
        let end = hm("work_end", &f.work_end)?;
        if end <= start {
            return Err(bad("work_end must be after work_start".into()));
        }
        let dates = |field: &str, list: &[String]| {
            list.iter()
                .map(|s| {
                    Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
                        .map_err(|e| bad(format!("{field}: {s:?} is not YYYY-MM-DD ({e})")))
                })
                .collect::<Result<BTreeSet<Date>, ControlError>>()
        };
        let holidays = dates("holidays", &f.holidays)?;
        let working_days = dates("working_days", &f.working_days)?;
        if let Some(d) = holidays.intersection(&working_days).next() {
            return Err(bad(format!("{d} is both a holiday and a working day")));
        }
        Ok(Self {
            offset,
            start,
            end,
            holidays,
            working_days,
        })
    }

    /// Reads a calendar file.
    ///
    /// # Errors
    /// [`ControlError::Calendar`].
    pub fn load(path: &Path) -> Result<Self, ControlError> {
        let text = std::fs::read_to_string(path).map_err(|e| ControlError::Calendar {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The shipped calendar.
    ///
    /// # Errors
    /// Only if the shipped file is broken (tested).
    pub fn builtin() -> Result<Self, ControlError> {
        Self::parse(DEFAULT_CALENDAR, "calendars/cn.toml")
    }

    /// Whether `date` (local) is a working day.
    pub fn working_day(&self, date: Date) -> Result<(), OffReason> {
        if self.working_days.contains(&date) {
            return Ok(());
        }
        if self.holidays.contains(&date) {
            return Err(OffReason::Holiday);
        }
        if matches!(date.weekday(), Weekday::Saturday | Weekday::Sunday) {
            return Err(OffReason::Weekend);
        }
        Ok(())
    }

    /// Whether `at` falls in working hours of a working day (local time).
    pub fn working_time(&self, at: OffsetDateTime) -> Result<(), OffReason> {
        let local = at.to_offset(self.offset);
        self.working_day(local.date())?;
        if local.time() < self.start || local.time() >= self.end {
            return Err(OffReason::OutsideHours);
        }
        Ok(())
    }

    /// The local UTC offset.
    pub fn offset(&self) -> UtcOffset {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn holidays_swapped_days_and_hours() {
        let c = Calendar::builtin().unwrap();
        // Tuesday 10:00 Beijing.
        assert_eq!(c.working_time(datetime!(2026-12-08 02:00 UTC)), Ok(()));
        // Tuesday 20:00 Beijing: night.
        assert_eq!(
            c.working_time(datetime!(2026-12-08 12:00 UTC)),
            Err(OffReason::OutsideHours)
        );
        // 2026-10-05 is a Monday in the National Day holiday.
        assert_eq!(
            c.working_time(datetime!(2026-10-05 02:00 UTC)),
            Err(OffReason::Holiday)
        );
        // Saturday 2026-10-10 is a swapped working day.
        assert_eq!(c.working_time(datetime!(2026-10-10 02:00 UTC)), Ok(()));
        // An ordinary Sunday.
        assert_eq!(
            c.working_time(datetime!(2026-12-06 02:00 UTC)),
            Err(OffReason::Weekend)
        );
        // 16:59 Beijing is in, 17:00 is out.
        assert_eq!(c.working_time(datetime!(2026-12-08 08:59 UTC)), Ok(()));
        assert_eq!(
            c.working_time(datetime!(2026-12-08 09:00 UTC)),
            Err(OffReason::OutsideHours)
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_field() {
        let e = Calendar::parse(
            "utc_offset = \"+08:00\"\nwork_start = \"09:00\"\nwork_end = \"17:00\"\nholidays = [\"2026-13-01\"]\n",
            "x.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("x.toml") && e.contains("2026-13-01"), "{e}");
        let e = Calendar::parse(
            "utc_offset = \"+08:00\"\nwork_start = \"17:00\"\nwork_end = \"09:00\"\n",
            "y.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("work_end"), "{e}");
    }
}
