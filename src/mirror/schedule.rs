//! When a mirror job runs: standard 5-field cron expressions evaluated in UTC, a
//! deterministic per-site jitter, missed-run detection and retry backoff.
//!
//! Pure arithmetic on Unix seconds: no clock, no I/O, so every rule is tested with fixed
//! instants. Cron semantics are Vixie cron's: fields `minute hour day-of-month month
//! day-of-week`, each `*`, a number, a range `a-b`, a list `a,b`, a step `*/n` or `a-b/n`;
//! month and weekday names (`jan`, `mon`); `0` and `7` are Sunday; when both day fields are
//! restricted a day matches if either does (when one starts with `*`, only the other
//! counts). Shortcuts: `@hourly`, `@daily` (`@midnight`), `@weekly`, `@monthly`,
//! `@yearly` (`@annually`).
//!
//! Written here rather than taken from a crate: every cron crate on crates.io brings a
//! calendar library (chrono and more) for what is a few hundred lines of UTC arithmetic.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

const MINUTE: u64 = 60;
const DAY: u64 = 86_400;

/// Days searched for the next match: more than the longest gap any valid expression can
/// have (Feb 29 on a given weekday recurs within 28 years).
const SEARCH_DAYS: u64 = 366 * 28 + 7;

/// A parsed cron expression.
#[derive(Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u32,
    /// Bits 1..=31.
    days: u32,
    /// Bits 1..=12.
    months: u16,
    /// Bits 0..=6, Sunday = 0.
    weekdays: u8,
    days_restricted: bool,
    weekdays_restricted: bool,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cron({:?})", self.text)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field's bits, and whether it starts with `*` (unrestricted for the day-field rule).
fn field(
    text: &str,
    name: &str,
    min: u32,
    max: u32,
    names: &[&str],
) -> Result<(u64, bool), String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            // Month names count from 1, weekday names from 0.
            return Ok(u32::try_from(i).unwrap_or(0) + min.min(1));
        }
        s.parse::<u32>()
            .map_err(|_| format!("{name}: {s:?} is not a number{}", hint(names)))
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{name}: step {s:?} must be a positive number"))?;
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `5/15` means from 5 to the end in steps of 15.
            (v, if step > 1 { max } else { v })
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!(
                "{name}: {range:?} is outside {min}-{max} or backwards"
            ));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, text.starts_with('*')))
}

fn hint(names: &[&str]) -> String {
    match (names.first(), names.last()) {
        (Some(a), Some(b)) => format!(" or a name {a}..{b}"),
        _ => String::new(),
    }
}

impl FromStr for Cron {
    type Err = String;

    fn from_str(text: &str) -> Result<Cron, String> {
        let expanded = match text.trim() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other if other.starts_with('@') => {
                return Err(format!("unknown shortcut {other:?}"));
            }
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(format!(
                "{text:?} has {} fields; a cron expression has 5 (minute hour day-of-month \
                 month day-of-week), e.g. \"0 2 * * *\"",
                fields.len()
            ));
        };
        let (minutes, _) = field(minute, "minute", 0, 59, &[])?;
        let (hours, _) = field(hour, "hour", 0, 23, &[])?;
        let (days, days_star) = field(day, "day of month", 1, 31, &[])?;
        let (months, _) = field(month, "month", 1, 12, &MONTHS)?;
        let (mut weekdays, weekdays_star) = field(weekday, "day of week", 0, 7, &WEEKDAYS)?;
        // 7 is Sunday too.
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & 0x7f;
        }
        Ok(Cron {
            text: text.trim().to_owned(),
            minutes,
            hours: u32::try_from(hours).unwrap_or(0),
            days: u32::try_from(days).unwrap_or(0),
            months: u16::try_from(months).unwrap_or(0),
            weekdays: u8::try_from(weekdays).unwrap_or(0),
            days_restricted: !days_star,
            weekdays_restricted: !weekdays_star,
        })
    }
}

/// (year, month 1-12, day 1-31) of a day number (days since 1970-01-01), by Howard
/// Hinnant's `civil_from_days`.
fn civil(days: u64) -> (u64, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

impl Cron {
    fn day_matches(&self, days: u64) -> bool {
        let (_, month, day) = civil(days);
        if self.months & (1 << month) == 0 {
            return false;
        }
        // 1970-01-01 was a Thursday.
        let weekday = (days + 4) % 7;
        let by_day = self.days & (1 << day) != 0;
        let by_weekday = self.weekdays & (1 << weekday) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => by_day || by_weekday,
            (true, false) => by_day,
            (false, true) => by_weekday,
            (false, false) => true,
        }
    }

    /// The first minute of the day (seconds into it) at or after `from` that matches.
    fn time_in_day(&self, from: u64) -> Option<u64> {
        let start_minute = from.div_ceil(MINUTE);
        (start_minute..24 * 60).find_map(|m| {
            let (hour, minute) = (m / 60, m % 60);
            (self.hours & (1 << hour) != 0 && self.minutes & (1 << minute) != 0)
                .then_some(m * MINUTE)
        })
    }

    /// The first time this expression fires strictly after `after` (Unix seconds), on a
    /// whole minute. `None` only for expressions that never fire (`0 0 31 2 *`).
    pub fn next_after(&self, after: u64) -> Option<u64> {
        let first_day = after / DAY;
        let mut within = after % DAY + 1;
        for day in first_day..first_day + SEARCH_DAYS {
            if self.day_matches(day)
                && let Some(secs) = self.time_in_day(within)
            {
                return Some(day * DAY + secs);
            }
            within = 0;
        }
        None
    }

    /// The first slot this expression fired after `last_slot` and at or before `now`,
    /// when there is one: a run the host missed (it was off, or the daemon was). The
    /// caller runs it once, however many slots were missed.
    pub fn missed(&self, last_slot: u64, now: u64) -> Option<u64> {
        self.next_after(last_slot).filter(|slot| *slot <= now)
    }
}

/// This site's offset into a job's jitter window: in `[0, jitter)`, the same for the same
/// instance and job every time (a site keeps its slot), spread evenly across a fleet.
pub fn jitter_offset(instance: &str, job: &str, jitter: Duration) -> Duration {
    let window = jitter.as_secs();
    if window == 0 {
        return Duration::ZERO;
    }
    let digest = Sha256::new()
        .chain_update(instance.as_bytes())
        .chain_update([0])
        .chain_update(job.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Duration::from_secs(u64::from_le_bytes(first) % window)
}

/// Exponential backoff between retries of a failed run: `base`, doubling per attempt, at
/// most `cap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The wait before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// When retry `attempt` of a run that failed at `failed_at` happens, or `None` when
    /// that would reach the job's next slot (`next_slot`): retries stay inside the window
    /// and the next scheduled run takes over.
    pub fn retry_at(&self, failed_at: u64, attempt: u32, next_slot: Option<u64>) -> Option<u64> {
        let at = failed_at.saturating_add(self.delay(attempt).as_secs());
        match next_slot {
            Some(slot) if at >= slot => None,
            _ => Some(at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn at(year: u64, month: u32, day: u32, hour: u64, minute: u64) -> u64 {
        // Count days with the inverse of `civil`, by search from a year start: simple
        // and independent of the code under test.
        let mut days = 0u64;
        for y in 1970..year {
            days += if is_leap(y) { 366 } else { 365 };
        }
        let lengths = [
            31,
            if is_leap(year) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        for m in 1..month {
            days += lengths[(m - 1) as usize];
        }
        days += u64::from(day - 1);
        days * DAY + hour * 3600 + minute * 60
    }

    fn is_leap(y: u64) -> bool {
        (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
    }

    fn cron(s: &str) -> Cron {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn civil_dates_round_trip_across_leap_years_and_centuries() {
        for (y, m, d) in [
            (1970, 1, 1),
            (2000, 2, 29),
            (2024, 2, 29),
            (2100, 3, 1),
            (2026, 12, 31),
        ] {
            let days = at(y, m, d, 0, 0) / DAY;
            assert_eq!(civil(days), (y, m, d));
        }
    }

    #[test]
    fn nightly_runs_next_at_two_utc() {
        let c = cron("0 2 * * *");
        assert_eq!(
            c.next_after(at(2026, 12, 5, 1, 30)),
            Some(at(2026, 12, 5, 2, 0))
        );
        // Strictly after: at the slot itself, the next one is tomorrow's.
        assert_eq!(
            c.next_after(at(2026, 12, 5, 2, 0)),
            Some(at(2026, 12, 6, 2, 0))
        );
        // Across a month and a year end.
        assert_eq!(
            c.next_after(at(2026, 12, 31, 3, 0)),
            Some(at(2027, 1, 1, 2, 0))
        );
    }

    #[test]
    fn steps_ranges_and_lists() {
        let c = cron("*/15 9-17 * * mon-fri");
        // Saturday 2026-12-05 → Monday 2026-12-07 09:00.
        assert_eq!(
            c.next_after(at(2026, 12, 5, 10, 7)),
            Some(at(2026, 12, 7, 9, 0))
        );
        assert_eq!(
            c.next_after(at(2026, 12, 7, 9, 0)),
            Some(at(2026, 12, 7, 9, 15))
        );
        assert_eq!(
            c.next_after(at(2026, 12, 7, 17, 45)),
            Some(at(2026, 12, 8, 9, 0))
        );
        let c = cron("5,35 0 1 jan,jul *");
        assert_eq!(
            c.next_after(at(2026, 2, 1, 0, 0)),
            Some(at(2026, 7, 1, 0, 5))
        );
        let c = cron("10/20 * * * *");
        assert_eq!(
            c.next_after(at(2026, 1, 1, 0, 11)),
            Some(at(2026, 1, 1, 0, 30))
        );
        assert_eq!(
            c.next_after(at(2026, 1, 1, 0, 50)),
            Some(at(2026, 1, 1, 1, 10))
        );
    }

    #[test]
    fn both_day_fields_restricted_match_either() {
        // The 13th, or any Friday.
        let c = cron("0 0 13 * fri");
        // Friday 2026-12-11 comes before Sunday the 13th.
        assert_eq!(
            c.next_after(at(2026, 12, 10, 0, 0)),
            Some(at(2026, 12, 11, 0, 0))
        );
        assert_eq!(
            c.next_after(at(2026, 12, 11, 0, 0)),
            Some(at(2026, 12, 13, 0, 0))
        );
        // With the weekday unrestricted (`*`), only the day of month counts.
        let c = cron("0 0 13 * *");
        assert_eq!(
            c.next_after(at(2026, 12, 10, 0, 0)),
            Some(at(2026, 12, 13, 0, 0))
        );
        // And `*/2` in the day field counts as unrestricted, as in Vixie cron.
        let c = cron("0 0 */2 * sun");
        assert_eq!(
            c.next_after(at(2026, 12, 10, 0, 0)),
            Some(at(2026, 12, 13, 0, 0))
        );
    }

    #[test]
    fn leap_days_and_month_ends() {
        let c = cron("0 12 29 2 *");
        assert_eq!(
            c.next_after(at(2025, 3, 1, 0, 0)),
            Some(at(2028, 2, 29, 12, 0))
        );
        let c = cron("30 23 31 * *");
        assert_eq!(
            c.next_after(at(2026, 4, 1, 0, 0)),
            Some(at(2026, 5, 31, 23, 30))
        );
        assert_eq!(cron("0 0 31 2 *").next_after(0), None);
    }

    #[test]
    fn sunday_is_zero_or_seven_and_shortcuts_expand() {
        let sunday = at(2026, 12, 6, 0, 0);
        assert_eq!(cron("0 0 * * 7").next_after(sunday - 60), Some(sunday));
        assert_eq!(cron("0 0 * * 0").next_after(sunday - 60), Some(sunday));
        assert_eq!(cron("@weekly").next_after(sunday - 60), Some(sunday));
        assert_eq!(cron("@daily"), cron("@daily"));
        assert_eq!(
            cron("@monthly").next_after(at(2026, 12, 5, 0, 0)),
            Some(at(2027, 1, 1, 0, 0))
        );
        assert_eq!(
            cron("@hourly").next_after(at(2026, 12, 5, 0, 0)),
            Some(at(2026, 12, 5, 1, 0))
        );
    }

    #[test]
    fn invalid_expressions_say_what_is_wrong() {
        for (text, needle) in [
            ("every now and then", "5"),
            ("0 2 * *", "4 fields"),
            ("60 * * * *", "minute"),
            ("0 24 * * *", "hour"),
            ("0 0 0 * *", "day of month"),
            ("0 0 * 13 *", "month"),
            ("0 0 * * 8", "day of week"),
            ("*/0 * * * *", "step"),
            ("0 0 * foo *", "month"),
            ("5-1 * * * *", "backwards"),
            ("@fortnightly", "shortcut"),
        ] {
            let e = text.parse::<Cron>().expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn a_missed_slot_is_reported_once() {
        let c = cron("0 2 * * *");
        let last = at(2026, 12, 1, 2, 0);
        // Off for three nights: one missed run (the first), not three.
        assert_eq!(
            c.missed(last, at(2026, 12, 4, 9, 0)),
            Some(at(2026, 12, 2, 2, 0))
        );
        // Nothing missed before the next slot.
        assert_eq!(c.missed(last, at(2026, 12, 2, 1, 59)), None);
    }

    #[test]
    fn jitter_is_stable_per_site_and_spread_across_sites() {
        let window = Duration::from_secs(1800);
        let a = jitter_offset("site-a", "apps", window);
        assert_eq!(a, jitter_offset("site-a", "apps", window));
        assert!(a < window);
        assert_ne!(
            jitter_offset("site-a", "apps", window),
            jitter_offset("site-a", "base", window),
            "jobs of one site spread too"
        );
        let offsets: std::collections::BTreeSet<u64> = (0..200)
            .map(|i| jitter_offset(&format!("site-{i}"), "apps", window).as_secs())
            .collect();
        assert!(
            offsets.len() > 150,
            "200 sites share {} offsets",
            offsets.len()
        );
        assert!(offsets.iter().all(|o| *o < 1800));
        assert_eq!(
            jitter_offset("site-a", "apps", Duration::ZERO),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_stays_inside_the_window() {
        let b = Backoff {
            base: Duration::from_secs(30),
            cap: Duration::from_secs(600),
        };
        let delays: Vec<u64> = (0..7).map(|i| b.delay(i).as_secs()).collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(b.delay(200).as_secs(), 600);
        assert_eq!(b.retry_at(1000, 0, Some(2000)), Some(1030));
        assert_eq!(b.retry_at(1000, 5, Some(1500)), None);
        assert_eq!(b.retry_at(1000, 5, None), Some(1600));
    }
}
