//! Rate limiting of failed authentication per client address.
//!
//! Owns the bookkeeping only: the caller asks [`FailureThrottle::check`] before trying a
//! credential and reports the outcome. Time is passed in, so the logic is pure and tested
//! without sleeping. Memory is bounded: at most `capacity` clients are tracked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Failures allowed per window before a client is refused until the window ends.
pub const DEFAULT_MAX_FAILURES: u32 = 10;
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Counts failed authentications per client in fixed windows: after `max_failures` within
/// one window, the client is refused until that window ends.
#[derive(Debug)]
pub struct FailureThrottle {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    clients: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Clone, Copy, Debug)]
struct Window {
    started: Instant,
    failures: u32,
}

impl Default for FailureThrottle {
    fn default() -> FailureThrottle {
        FailureThrottle::new(DEFAULT_MAX_FAILURES, DEFAULT_WINDOW, DEFAULT_CAPACITY)
    }
}

impl FailureThrottle {
    /// `max_failures` and `capacity` are at least 1.
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> FailureThrottle {
        FailureThrottle {
            max_failures: max_failures.max(1),
            window,
            capacity: capacity.max(1),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` if `ip` has failed too often in its current window.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let clients = self.clients();
        let Some(w) = clients.get(&client_key(ip)) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(w.started);
        if w.failures >= self.max_failures && elapsed < self.window {
            Err(self.window - elapsed)
        } else {
            Ok(())
        }
    }

    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let key = client_key(ip);
        let mut clients = self.clients();
        if let Some(w) = clients.get_mut(&key) {
            if now.saturating_duration_since(w.started) >= self.window {
                *w = Window {
                    started: now,
                    failures: 1,
                };
            } else {
                w.failures = w.failures.saturating_add(1);
            }
            return;
        }
        if clients.len() >= self.capacity {
            self.make_room(&mut clients, now);
        }
        clients.insert(
            key,
            Window {
                started: now,
                failures: 1,
            },
        );
    }

    /// A client that authenticated starts afresh.
    pub fn record_success(&self, ip: IpAddr) {
        self.clients().remove(&client_key(ip));
    }

    /// Drops finished windows; if every window is still running, drops the oldest, which
    /// is the one closest to ending anyway. Linear, but only when the map is full.
    fn make_room(&self, clients: &mut HashMap<IpAddr, Window>, now: Instant) {
        clients.retain(|_, w| now.saturating_duration_since(w.started) < self.window);
        if clients.len() >= self.capacity {
            let oldest = clients
                .iter()
                .min_by_key(|(_, w)| w.started)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                clients.remove(&oldest);
            }
        }
    }

    fn clients(&self) -> MutexGuard<'_, HashMap<IpAddr, Window>> {
        // Every update leaves the map consistent, so a poisoned lock is still usable.
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The unit a client is counted by: its IPv4 address (also when IPv4-mapped), or the
/// /64 prefix of an IPv6 address, since one host usually controls a whole /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid address")
    }

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn blocks_after_limit_until_window_ends() {
        let t = FailureThrottle::new(3, WINDOW, 100);
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(t.check(a, t0), Ok(()), "attempt {i}");
            t.record_failure(a, t0 + Duration::from_secs(i));
        }
        assert_eq!(
            t.check(a, t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(50))
        );
        assert_eq!(t.check(ip("192.0.2.2"), t0), Ok(()));
        assert_eq!(t.check(a, t0 + WINDOW), Ok(()));
        // A failure in a new window starts a new count.
        t.record_failure(a, t0 + WINDOW);
        assert_eq!(t.check(a, t0 + WINDOW), Ok(()));
    }

    #[test]
    fn failures_spread_over_windows_never_block() {
        let t = FailureThrottle::new(3, WINDOW, 100);
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        for i in 0..20 {
            let now = t0 + WINDOW / 2 * i;
            assert_eq!(t.check(a, now), Ok(()), "failure {i}");
            t.record_failure(a, now);
        }
    }

    #[test]
    fn success_resets() {
        let t = FailureThrottle::new(2, WINDOW, 100);
        let a = ip("192.0.2.1");
        let t0 = Instant::now();
        t.record_failure(a, t0);
        t.record_failure(a, t0);
        assert!(t.check(a, t0).is_err());
        t.record_success(a);
        assert_eq!(t.check(a, t0), Ok(()));
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let t = FailureThrottle::new(2, WINDOW, 100);
        let t0 = Instant::now();
        t.record_failure(ip("2001:db8:1:2::1"), t0);
        t.record_failure(ip("2001:db8:1:2:ffff::9"), t0);
        assert!(t.check(ip("2001:db8:1:2::77"), t0).is_err());
        assert_eq!(t.check(ip("2001:db8:1:3::1"), t0), Ok(()));

        t.record_failure(ip("::ffff:192.0.2.9"), t0);
        t.record_failure(ip("192.0.2.9"), t0);
        assert!(t.check(ip("192.0.2.9"), t0).is_err());
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_client_is_evicted() {
        let t = FailureThrottle::new(1, WINDOW, 3);
        let t0 = Instant::now();
        for i in 0..3u8 {
            t.record_failure(
                ip(&format!("192.0.2.{i}")),
                t0 + Duration::from_secs(i.into()),
            );
        }
        t.record_failure(ip("192.0.2.100"), t0 + Duration::from_secs(5));
        assert_eq!(t.clients().len(), 3);
        assert_eq!(
            t.check(ip("192.0.2.0"), t0 + Duration::from_secs(5)),
            Ok(())
        );
        assert!(
            t.check(ip("192.0.2.1"), t0 + Duration::from_secs(5))
                .is_err()
        );
        assert!(
            t.check(ip("192.0.2.100"), t0 + Duration::from_secs(5))
                .is_err()
        );

        // Finished windows go first, all of them.
        t.record_failure(ip("198.51.100.1"), t0 + WINDOW * 3);
        assert_eq!(t.clients().len(), 1);
    }
}
