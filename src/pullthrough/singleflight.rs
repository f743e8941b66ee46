//! One piece of work per key at a time: the first caller starts it as a detached task,
//! later callers with the same key wait for the same result.
//!
//! The work runs to completion even if every waiter goes away, so a client that hangs
//! up never leaves half-done state behind and the next caller finds the result stored.
//! A key is released however its work ends — with a result, a panic, or a cancelled
//! task (runtime shutdown) — so the next caller always becomes a new leader; waiters of
//! work that died without a result get `None`.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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
        let mut running = self.lock();
        if let Some(rx) = running.get(&key) {
            return Waiter {
                rx: rx.clone(),
                joined: true,
            };
        }
        let (tx, rx) = watch::channel(None);
        running.insert(key.clone(), rx.clone());
        drop(running);
        // Armed before `work()` runs, so even a panic while building the work releases
        // the key.
        let leader = Leader {
            flights: Arc::clone(self),
            key,
            rx: rx.clone(),
            tx,
        };
        let fut = work();
        tokio::spawn(async move {
            let value = fut.await;
            // Publish before leaving the map (when `leader` drops): a caller arriving in
            // between gets this result instead of starting the work again.
            let _ = leader.tx.send(Some(value));
        });
        Waiter { rx, joined: false }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, watch::Receiver<Option<V>>>> {
        // Nothing panics while holding the map; were it poisoned anyway, refusing every
        // later caller would be worse than using it.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The leader's hold on its key, released on drop whether the work finished, panicked
/// or was cancelled.
struct Leader<K: Hash + Eq, V> {
    flights: Arc<Singleflight<K, V>>,
    key: K,
    /// Identifies this run's entry, so a newer run under the same key is left alone.
    rx: watch::Receiver<Option<V>>,
    tx: watch::Sender<Option<V>>,
}

impl<K: Hash + Eq, V> Drop for Leader<K, V> {
    fn drop(&mut self) {
        let mut running = self
            .flights
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if running
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            running.remove(&self.key);
        }
        // `tx` drops after this: waiters of unpublished work wake up and get `None`.
    }
}

impl<V: Clone> Waiter<V> {
    /// The result, or `None` if the work died without one (panicked or cancelled).
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

    /// Regression: a leader whose work panicked left its key in the map, and every later
    /// caller joined the dead run and got an internal error until restart.
    #[tokio::test]
    async fn a_panicking_leader_does_not_wedge_its_key() {
        let flights: Arc<Singleflight<&str, u32>> = Arc::default();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let doomed = flights.join("k", move || async move {
            let _ = wait.await;
            panic!("work failed");
        });
        let follower = flights.join("k", || async { unreachable!("joins the running work") });
        assert!(follower.joined);
        let _ = go.send(());
        assert_eq!(doomed.wait().await, None);
        assert_eq!(follower.wait().await, None);
        let next = flights.join("k", || async { 9 });
        assert!(!next.joined, "the next caller leads a new run");
        assert_eq!(next.wait().await, Some(9));
    }

    /// Regression: a leader whose task was cancelled (its runtime shut down mid-work)
    /// left its key in the map, so the work was never tried again.
    #[test]
    fn a_cancelled_leader_does_not_wedge_its_key() {
        let flights: Arc<Singleflight<&str, u32>> = Arc::default();
        let doomed_rt = runtime();
        let follower = doomed_rt.block_on(async {
            let leader = flights.join("k", std::future::pending::<u32>);
            assert!(!leader.joined);
            flights.join("k", || async { unreachable!("joins the running work") })
        });
        // Dropping the runtime cancels the leader's task mid-work.
        drop(doomed_rt);
        runtime().block_on(async {
            assert_eq!(follower.wait().await, None);
            let next = flights.join("k", || async { 3 });
            assert!(!next.joined, "the next caller leads a new run");
            assert_eq!(next.wait().await, Some(3));
        });
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }
}
