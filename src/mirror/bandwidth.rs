//! The bandwidth cap of a job: one token bucket shared by all of the job's concurrent
//! transfers, so the cap holds for the job as a whole. Must not know HTTP: it paces
//! chunks of any stream.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// The most a bucket holds: a tenth of a second of its rate, so that even a short job
/// averages the cap (a full second of burst put a 4 s run 20 % over it), but at least
/// one chunk's worth.
const BURST_SECONDS: f64 = 0.1;
const MIN_BURST: f64 = 64.0 * 1024.0;

/// A token bucket of `rate` bytes per second holding at most [`BURST_SECONDS`] of tokens.
pub(super) struct Bucket {
    rate: f64,
    capacity: f64,
    /// When tokens were last added, and how many there are (negative: owed).
    state: Mutex<(Instant, f64)>,
}

impl Bucket {
    /// `rate` is at least 1 byte per second.
    pub(super) fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        let capacity = (rate * BURST_SECONDS).max(MIN_BURST);
        Bucket {
            rate,
            capacity,
            state: Mutex::new((Instant::now(), capacity)),
        }
    }

    /// Takes `n` bytes' worth of tokens, waiting until the bucket can pay for them. The
    /// lock is held while waiting, so transfers are paid for in order and together
    /// never run past the rate.
    pub(super) async fn take(&self, n: usize) {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let (last, tokens) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate)
            .min(self.capacity)
            - n as f64;
        *state = (now, tokens);
        if tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-tokens / self.rate)).await;
            *state = (Instant::now(), 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent transfers share one bucket: together they never run past the rate
    /// (after the first second's burst). Paused time: the figures are exact.
    #[tokio::test(start_paused = true)]
    async fn concurrent_transfers_together_hold_the_rate() {
        let bucket = std::sync::Arc::new(Bucket::new(1_000_000));
        let start = Instant::now();
        let transfers: Vec<_> = (0..3)
            .map(|_| {
                let bucket = bucket.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        bucket.take(100_000).await;
                    }
                })
            })
            .collect();
        for t in transfers {
            t.await.expect("transfer");
        }
        // 3 MB at 1 MB/s, of which the first 0.1 MB is the bucket's burst: 2.9 s.
        let took = start.elapsed().as_secs_f64();
        assert!((2.89..2.95).contains(&took), "{took}");
    }
}
