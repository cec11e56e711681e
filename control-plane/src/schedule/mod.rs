//! Schedules: an event's cron expression in an IANA time zone, its policies (daylight saving,
//! misfire, overlap), the computation of fire times ("slots") and the clock the scheduler reads.
//!
//! Fire times are computed on the wall clock of the schedule's zone: croner matches the
//! expression against local date-times, and each match is turned into instants by the
//! daylight-saving policy:
//!
//! - a local time that exists once fires once;
//! - a local time in the repeated hour (fall back) fires at its first occurrence, or with
//!   [`DstPolicy::Twice`] at both;
//! - a local time in the skipped hour (spring forward) does not fire with [`DstPolicy::Skip`];
//!   otherwise it fires once at the instant the gap ends (several such slots fire once together).

pub mod scheduler;
#[cfg(test)]
mod tests;

use chrono::{DateTime, LocalResult, NaiveDateTime, Offset, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// What happens to slots that fall into a daylight-saving transition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DstPolicy {
    /// A slot in the skipped hour does not fire; a slot in the repeated hour fires once.
    Skip,
    /// A slot in the skipped hour fires once when the gap ends; the repeated hour fires once.
    #[default]
    Once,
    /// Like `Once`, but a slot in the repeated hour fires at both of its instants.
    Twice,
}

impl DstPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DstPolicy::Skip => "skip",
            DstPolicy::Once => "once",
            DstPolicy::Twice => "twice",
        }
    }

    pub fn parse(text: &str) -> Option<DstPolicy> {
        Some(match text {
            "skip" => DstPolicy::Skip,
            "once" => DstPolicy::Once,
            "twice" => DstPolicy::Twice,
            _ => return None,
        })
    }
}

/// What happens to slots that passed while the scheduler was not running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Misfire {
    /// Missed slots do not run; the schedule continues with the next slot.
    #[default]
    Skip,
    /// One run stands for all the missed slots (`missed_slots` on the run).
    RunOnce,
}

impl Misfire {
    pub fn as_str(self) -> &'static str {
        match self {
            Misfire::Skip => "skip",
            Misfire::RunOnce => "run_once",
        }
    }

    pub fn parse(text: &str) -> Option<Misfire> {
        Some(match text {
            "skip" => Misfire::Skip,
            "run_once" => Misfire::RunOnce,
            _ => return None,
        })
    }
}

/// What happens to a slot while the event's previous scheduled run has unfinished jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overlap {
    /// The slot fires anyway.
    #[default]
    Allow,
    /// The slot is skipped and recorded with the reason `overlap`.
    Forbid,
    /// The slot stays pending and fires when the previous run has finished.
    Queue,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Allow => "allow",
            Overlap::Forbid => "forbid",
            Overlap::Queue => "queue",
        }
    }

    pub fn parse(text: &str) -> Option<Overlap> {
        Some(match text {
            "allow" => Overlap::Allow,
            "forbid" => Overlap::Forbid,
            "queue" => Overlap::Queue,
            _ => return None,
        })
    }
}

/// An event's schedule as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleSpec {
    pub cron: String,
    pub timezone: String,
    pub dst: DstPolicy,
    pub misfire: Misfire,
    pub overlap: Overlap,
}

/// An invalid schedule: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScheduleError {
    pub field: &'static str,
    pub message: String,
}

/// A parsed schedule that computes fire times.
pub struct CompiledSchedule {
    cron: Cron,
    zone: chrono_tz::Tz,
    dst: DstPolicy,
}

/// The largest UTC offset of any zone, in seconds (+14:00).
const MAX_ABS_OFFSET: i64 = 14 * 3600;

/// Most cron matches examined to find one fire time (a bound, never reached by a valid
/// expression outside a transition).
const MAX_CANDIDATES: usize = 20_000;

impl CompiledSchedule {
    /// Parses a cron expression of 5 fields (minute first) or 6 (second first) and an IANA zone.
    pub fn new(cron: &str, timezone: &str, dst: DstPolicy) -> Result<Self, ScheduleError> {
        let fields = cron.split_whitespace().count();
        let nickname = cron.trim_start().starts_with('@');
        if !nickname && !(5..=6).contains(&fields) {
            return Err(ScheduleError {
                field: "schedule.cron",
                message: format!(
                    "has {fields} fields; expected 5 (minute first) or 6 (second first)"
                ),
            });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|error| ScheduleError {
                field: "schedule.cron",
                message: format!("is not a valid cron expression: {error}"),
            })?;
        let zone: chrono_tz::Tz = timezone.parse().map_err(|_| ScheduleError {
            field: "schedule.timezone",
            message: format!("{timezone:?} is not an IANA time zone (like Europe/Berlin or UTC)"),
        })?;
        let schedule = CompiledSchedule { cron, zone, dst };
        Ok(schedule)
    }

    pub fn zone(&self) -> chrono_tz::Tz {
        self.zone
    }

    /// The UTC offset of the zone at `instant_ms`, in seconds.
    fn offset_at(&self, instant_ms: i64) -> i64 {
        let utc = DateTime::<Utc>::from_timestamp_millis(instant_ms)
            .unwrap_or_default()
            .naive_utc();
        i64::from(
            self.zone
                .offset_from_utc_datetime(&utc)
                .fix()
                .local_minus_utc(),
        )
    }

    /// The smallest and largest offsets within a day of `instant_ms`.
    fn offsets_around(&self, instant_ms: i64) -> (i64, i64) {
        let day = 26 * 3600 * 1000;
        let offsets = [
            self.offset_at(instant_ms - day),
            self.offset_at(instant_ms),
            self.offset_at(instant_ms + day),
        ];
        let min = offsets.iter().copied().min().unwrap_or(0);
        let max = offsets.iter().copied().max().unwrap_or(0);
        (min, max)
    }

    /// The instants (ms) at which the local time `wall` fires, by the DST policy.
    fn instants(&self, wall: NaiveDateTime) -> Vec<i64> {
        match self.zone.from_local_datetime(&wall) {
            LocalResult::Single(time) => vec![time.timestamp_millis()],
            LocalResult::Ambiguous(first, second) => match self.dst {
                DstPolicy::Twice => vec![first.timestamp_millis(), second.timestamp_millis()],
                DstPolicy::Skip | DstPolicy::Once => vec![first.timestamp_millis()],
            },
            LocalResult::None => match self.dst {
                DstPolicy::Skip => Vec::new(),
                DstPolicy::Once | DstPolicy::Twice => vec![self.gap_end(wall)],
            },
        }
    }

    /// The instant (ms) a gap containing the local time `wall` ends: the first instant whose
    /// local time is at or after `wall`.
    fn gap_end(&self, wall: NaiveDateTime) -> i64 {
        let as_utc = wall.and_utc().timestamp();
        let (min, max) = self.offsets_around(as_utc * 1000);
        // Seconds: local(lo) < wall <= local(hi).
        let (mut lo, mut hi) = (as_utc - max, as_utc - min);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let local = self
                .zone
                .timestamp_opt(mid, 0)
                .single()
                .map(|time| time.naive_local());
            if local.is_some_and(|local| local >= wall) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi * 1000
    }

    /// The first fire time strictly after `after_ms`, or `None` if the expression never
    /// matches again.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let (min_offset, _) = self.offsets_around(after_ms);
        // A local time `w` fires at `w - offset(w)`; only `w > after + min_offset` can be later.
        let after = DateTime::<Utc>::from_timestamp_millis(after_ms)?.naive_utc();
        let mut cursor = after + chrono::Duration::seconds(min_offset);
        let mut best: Option<(i64, i64)> = None; // (instant, allowed spread)
        for _ in 0..MAX_CANDIDATES {
            let wall = self.cron.find_next_occurrence(&cursor, false).ok()?;
            let wall_ms = wall.and_utc().timestamp_millis();
            if let Some((best_ms, spread)) = best {
                // Later local times fire later, except across a backward transition, which
                // moves local time back by at most the spread of offsets around it.
                if wall_ms - MAX_ABS_OFFSET * 1000 > best_ms
                    || wall_ms > best_local(best_ms, self) + spread
                {
                    break;
                }
            }
            for instant in self.instants(wall) {
                if instant > after_ms && best.is_none_or(|(best_ms, _)| instant < best_ms) {
                    let (min, max) = self.offsets_around(instant);
                    best = Some((instant, (max - min) * 1000));
                }
            }
            cursor = wall;
        }
        best.map(|(instant, _)| instant)
    }

    /// The next `count` fire times after `after_ms`.
    pub fn upcoming(&self, after_ms: i64, count: usize) -> Vec<i64> {
        let mut times = Vec::with_capacity(count);
        let mut cursor = after_ms;
        while times.len() < count {
            match self.next_after(cursor) {
                Some(next) => {
                    times.push(next);
                    cursor = next;
                }
                None => break,
            }
        }
        times
    }
}

/// The local time of `instant_ms` in the schedule's zone, as milliseconds of a naive clock.
fn best_local(instant_ms: i64, schedule: &CompiledSchedule) -> i64 {
    instant_ms + schedule.offset_at(instant_ms) * 1000
}

/// Where the scheduler reads the time. Production uses [`SystemClock`]; tests set the time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::store::now_ms()
    }
}

/// A fire time as the API shows it: RFC 3339 in the schedule's zone and in UTC.
pub fn fire_time_json(instant_ms: i64, zone: chrono_tz::Tz) -> serde_json::Value {
    let utc = DateTime::<Utc>::from_timestamp_millis(instant_ms).unwrap_or_default();
    serde_json::json!({
        "local": utc.with_timezone(&zone).to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        "utc": utc.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    })
}
