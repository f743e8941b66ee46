//! The bandwidth cap of a job: one token bucket shared by all of the job's concurrent
//! transfers, so the cap holds for the job as a whole. Must not know HTTP: it paces
//! chunks of any stream.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A token bucket of `rate` bytes per second holding at most one second of tokens.
pub struct Bucket {
    rate: f64,
    /// When tokens were last added, and how many there are (negative: owed).
    state: Mutex<(Instant, f64)>,
}

impl Bucket {
    /// `rate` is at least 1 byte per second.
    pub fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        Bucket {
            rate,
            state: Mutex::new((Instant::now(), rate)),
        }
    }

    /// Takes `n` bytes' worth of tokens, waiting until the bucket can pay for them. The
    /// lock is held while waiting, so transfers are paid for in order and together
    /// never run past the rate.
    pub async fn take(&self, n: usize) {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let (last, tokens) = *state;
        let tokens =
            (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate) - n as f64;
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

    #[tokio::test]
    async fn the_rate_holds_after_the_first_second() {
        let bucket = Bucket::new(1_000_000);
        let start = Instant::now();
        for _ in 0..30 {
            bucket.take(100_000).await;
        }
        // 3 MB at 1 MB/s with a 1 MB burst: at least 2 s.
        let took = start.elapsed().as_secs_f64();
        assert!((1.9..3.5).contains(&took), "{took}");
    }
}
