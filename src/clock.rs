//! The time decisions are made at (tag freshness, mirror schedules): the wall clock (what
//! is stored is stamped with wall-clock times, which survive restarts), plus however far
//! tokio's clock has been moved ahead of real time. In production tokio's clock is real
//! time, so this is the wall clock; a test pauses tokio's time and moves schedules and
//! TTLs along without sleeping.

use std::time::Instant;

use crate::storage::now_secs;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    real: Instant,
    runtime: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            real: Instant::now(),
            runtime: tokio::time::Instant::now(),
        }
    }

    /// Seconds since the Unix epoch, as freshness sees them.
    pub(crate) fn now_secs(&self) -> u64 {
        let ahead = self
            .runtime
            .elapsed()
            .saturating_sub(self.real.elapsed())
            .as_secs();
        now_secs().saturating_add(ahead)
    }
}
