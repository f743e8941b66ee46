//! The per-upstream circuit breaker: a pure state machine over explicit instants.
//!
//! Closed counts consecutive failures; at the threshold it opens for the cooldown. Once
//! the cooldown is over, exactly one call (the probe) is admitted: its success closes the
//! breaker, its failure reopens it. A `Retry-After` from the upstream holds the breaker
//! open until then at least. This module does no I/O and reads no clock: the caller passes
//! `now`, so every transition is unit-tested without sleeping.

use std::time::Duration;

use tokio::time::Instant;

/// What the breaker reports for health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests fail fast without reaching the upstream.
    Open,
    /// The cooldown is over: the next request (or the one in flight) probes the upstream.
    HalfOpen,
}

/// How a call was let through; hand it back with the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    /// The single call allowed after a cooldown; its outcome decides the state.
    Probe,
}

/// Why a call was refused without reaching the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Open: retry in this long. `rate_limited` when a `429 Retry-After` opened it.
    Open {
        retry_in: Duration,
        rate_limited: bool,
    },
    /// Half-open, and the probe is still in flight.
    Probing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant, rate_limited: bool },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: State,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: State::Closed { failures: 0 },
        }
    }

    /// Lets a call through or refuses it.
    pub fn admit(&mut self, now: Instant) -> Result<Admission, Refusal> {
        match self.state {
            State::Closed { .. } => Ok(Admission::Normal),
            State::Open {
                until,
                rate_limited,
            } if now < until => Err(Refusal::Open {
                retry_in: until - now,
                rate_limited,
            }),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Ok(Admission::Probe)
            }
            State::HalfOpen { probing: true } => Err(Refusal::Probing),
        }
    }

    /// The upstream answered (404 and 401 included). Only a probe closes an open breaker:
    /// a call admitted before the breaker opened proves nothing about the upstream now.
    pub fn success(&mut self, admission: Admission) {
        match (self.state, admission) {
            (State::Closed { .. }, _) | (State::HalfOpen { .. }, Admission::Probe) => {
                self.state = State::Closed { failures: 0 };
            }
            _ => {}
        }
    }

    /// The upstream was unreachable, failed or rate-limited us.
    pub fn failure(&mut self, now: Instant, admission: Admission) {
        let reopen = now + self.cooldown;
        match (self.state, admission) {
            (State::Closed { failures }, _) => {
                let failures = failures.saturating_add(1);
                self.state = if failures >= self.threshold {
                    State::Open {
                        until: reopen,
                        rate_limited: false,
                    }
                } else {
                    State::Closed { failures }
                };
            }
            (State::HalfOpen { .. }, Admission::Probe) => {
                self.state = State::Open {
                    until: reopen,
                    rate_limited: false,
                };
            }
            // The probe failed after its own Retry-After opened the breaker: the longer wins.
            (
                State::Open {
                    until,
                    rate_limited,
                },
                Admission::Probe,
            ) => {
                self.state = State::Open {
                    until: until.max(reopen),
                    rate_limited,
                };
            }
            // A straggler admitted before the breaker opened, or while a probe is out.
            _ => {}
        }
    }

    /// A call that was admitted ended without an outcome (the caller went away).
    pub fn abandon(&mut self, admission: Admission) {
        if admission == Admission::Probe && self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }

    /// The upstream asked us (`Retry-After`) to stay away for `delay`.
    pub fn hold(&mut self, now: Instant, delay: Duration, rate_limited: bool) {
        let until = now + delay;
        self.state = match self.state {
            State::Open {
                until: current,
                rate_limited: was,
            } if current >= until => State::Open {
                until: current,
                rate_limited: was,
            },
            _ => State::Open {
                until,
                rate_limited,
            },
        };
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until, .. } if now < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(30);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, COOL);
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Ok(Admission::Normal));
            b.failure(t0, Admission::Normal);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failure(t0, Admission::Normal);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + s(10)),
            Err(Refusal::Open {
                retry_in: s(20),
                rate_limited: false
            })
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, COOL);
        b.failure(t0, Admission::Normal);
        b.success(Admission::Normal);
        b.failure(t0, Admission::Normal);
        assert_eq!(b.state(t0), BreakerState::Closed);
    }

    #[test]
    fn half_open_admits_exactly_one_probe_and_success_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        b.failure(t0, Admission::Normal);
        let later = t0 + COOL;
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert_eq!(b.admit(later), Ok(Admission::Probe));
        assert_eq!(b.admit(later), Err(Refusal::Probing));
        assert_eq!(b.admit(later + s(100)), Err(Refusal::Probing));
        b.success(Admission::Probe);
        assert_eq!(b.state(later), BreakerState::Closed);
        assert_eq!(b.admit(later), Ok(Admission::Normal));
    }

    #[test]
    fn probe_failure_reopens_for_a_full_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        b.failure(t0, Admission::Normal);
        let t1 = t0 + s(31);
        assert_eq!(b.admit(t1), Ok(Admission::Probe));
        b.failure(t1 + s(1), Admission::Probe);
        assert_eq!(b.state(t1 + s(30)), BreakerState::Open);
        assert_eq!(b.state(t1 + s(31)), BreakerState::HalfOpen);
    }

    #[test]
    fn stragglers_do_not_decide_an_open_or_probing_breaker() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        b.failure(t0, Admission::Normal);
        // A call admitted before the breaker opened succeeds late.
        b.success(Admission::Normal);
        assert_eq!(b.state(t0), BreakerState::Open);
        let t1 = t0 + COOL;
        assert_eq!(b.admit(t1), Ok(Admission::Probe));
        b.failure(t1, Admission::Normal);
        b.success(Admission::Normal);
        assert_eq!(b.admit(t1), Err(Refusal::Probing));
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        b.failure(t0, Admission::Normal);
        let t1 = t0 + COOL;
        assert_eq!(b.admit(t1), Ok(Admission::Probe));
        b.abandon(Admission::Probe);
        assert_eq!(b.admit(t1), Ok(Admission::Probe));
        b.abandon(Admission::Normal);
        assert_eq!(b.admit(t1), Err(Refusal::Probing));
    }

    #[test]
    fn retry_after_holds_open_at_least_until_then() {
        let t0 = Instant::now();
        let mut b = Breaker::new(5, COOL);
        b.hold(t0, s(120), true);
        b.failure(t0, Admission::Normal);
        assert_eq!(
            b.admit(t0 + s(100)),
            Err(Refusal::Open {
                retry_in: s(20),
                rate_limited: true
            })
        );
        // A shorter hold never shortens a longer one.
        b.hold(t0 + s(1), s(5), false);
        assert_eq!(b.state(t0 + s(119)), BreakerState::Open);
        assert_eq!(b.admit(t0 + s(120)), Ok(Admission::Probe));
    }

    #[test]
    fn probe_answered_with_short_retry_after_still_waits_the_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        b.failure(t0, Admission::Normal);
        let t1 = t0 + COOL;
        assert_eq!(b.admit(t1), Ok(Admission::Probe));
        b.hold(t1, s(2), true);
        b.failure(t1, Admission::Probe);
        assert_eq!(b.state(t1 + s(29)), BreakerState::Open);
        assert_eq!(b.state(t1 + COOL), BreakerState::HalfOpen);
    }
}
