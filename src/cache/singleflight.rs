//! One piece of work per key at a time: the first caller starts it as a detached task,
//! later callers with the same key wait for the same result.
//!
//! The work runs to completion even if every waiter goes away, so a client that hangs
//! up never leaves half-done state behind and the next caller finds the result stored.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// In-flight work keyed by `K`, producing `V`.
pub struct Singleflight<K, V> {
    running: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

/// A handle on work in flight.
pub struct Waiter<V> {
    rx: watch::Receiver<Option<V>>,
    /// Whether this caller joined work another caller started.
    pub joined: bool,
}

impl<K, V> Default for Singleflight<K, V> {
    fn default() -> Self {
        Singleflight {
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, V> Singleflight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Joins the work running for `key`, or starts `work()` for it.
    pub fn join<F, W>(self: &Arc<Self>, key: K, work: W) -> Waiter<V>
    where
        W: FnOnce() -> F,
        F: Future<Output = V> + Send + 'static,
    {
        let mut running = match self.running.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(rx) = running.get(&key) {
            return Waiter {
                rx: rx.clone(),
                joined: true,
            };
        }
        let (tx, rx) = watch::channel(None);
        running.insert(key.clone(), rx.clone());
        drop(running);
        let this = Arc::clone(self);
        let fut = work();
        tokio::spawn(async move {
            let value = fut.await;
            // Publish before leaving the map: a caller arriving in between gets this
            // result instead of starting the work again.
            let _ = tx.send(Some(value));
            if let Ok(mut running) = this.running.lock() {
                running.remove(&key);
            }
        });
        Waiter { rx, joined: false }
    }
}

impl<V: Clone> Waiter<V> {
    /// The result, or `None` if the work panicked.
    pub async fn wait(mut self) -> Option<V> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights: Arc<Singleflight<&str, u32>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..8 {
            let runs = runs.clone();
            waiters.push(flights.join("k", move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                7
            }));
        }
        assert_eq!(waiters.iter().filter(|w| w.joined).count(), 7);
        for w in waiters {
            assert_eq!(w.wait().await, Some(7));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Finished work leaves the map: the next caller runs it again.
        let again = flights.join("k", || async { 8 });
        assert!(!again.joined);
        assert_eq!(again.wait().await, Some(8));
    }

    #[tokio::test]
    async fn work_survives_waiters_going_away() {
        let flights: Arc<Singleflight<u8, u8>> = Arc::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        drop(flights.join(1, move || async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = tx.send(());
            1
        }));
        assert!(
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .is_ok()
        );
    }
}
