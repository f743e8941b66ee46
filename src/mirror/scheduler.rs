//! The in-daemon scheduler: runs each job with a `schedule` at its cron slots (UTC) plus
//! this site's jitter offset, runs a slot missed while the daemon was down once soon
//! after start-up, and retries a failed run with backoff until the next slot comes.
//!
//! A job never overlaps itself: its slots run one after the other here, and the mirror
//! service refuses a manual run of a job that is running. A reload that changes or
//! removes a job retires its schedule once no run is in progress; a new or changed job
//! gets a schedule of its own (a changed job's, once the old schedule's run is done). The last slot run is durable
//! (in the job's run record), so a restart neither repeats it nor forgets a missed one.
//! Time is the wall clock as `crate::clock::Clock` reads it, so tests drive schedules
//! with tokio's paused time.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::schedule::{Backoff, Cron};
use crate::clock::Clock;

/// A missed slot runs within this long after start-up (spread by the site's offset).
const CATCH_UP_WITHIN: u64 = 300;

/// The longest single sleep: the wall clock is read again at least this often, so a
/// clock set right after boot (edge hosts without an RTC) moves the plan.
const MAX_SLEEP: u64 = 3600;

/// Retries of a failed run: 1 minute, doubling, at most an hour, never past the next slot.
pub(crate) const RETRIES: Backoff = Backoff {
    base: Duration::from_secs(60),
    cap: Duration::from_secs(3600),
};

/// The next run of a job: the slot it stands for, and when it starts (Unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub slot: u64,
    pub at: u64,
}

/// When a job with `cron`, this site's `offset` and `last_slot` (the last slot it ran,
/// if any) runs next, at `now`. A slot missed since `last_slot` runs once, soon: it
/// stands for the newest missed slot, so the older ones are not run one by one.
pub(crate) fn next_run(cron: &Cron, offset: u64, last_slot: Option<u64>, now: u64) -> Option<Plan> {
    if let Some(last) = last_slot
        && let Some(mut slot) = cron.missed(last, now)
    {
        // The newest slot at or before now (bounded: a minutely job off for a year).
        for _ in 0..1_000_000 {
            match cron.next_after(slot) {
                Some(next) if next <= now => slot = next,
                _ => break,
            }
        }
        return Some(Plan {
            slot,
            at: now + offset.min(CATCH_UP_WITHIN),
        });
    }
    let slot = cron.next_after(now)?;
    Some(Plan {
        slot,
        at: slot + offset,
    })
}

/// Runs one slot of a job; `true` when every selected tag was mirrored.
pub(crate) type RunSlot =
    Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// The daemon's schedule tasks: one per job with a `schedule`, each in a task of its
/// own, started at start-up and brought in line with the jobs after a configuration
/// reload ([`Schedules::apply`]).
pub(crate) struct Schedules {
    mirror: super::Mirror,
    /// This site's stable id: it places the site in each job's jitter window.
    instance: String,
    clock: Clock,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Each scheduled job, by name.
    active: tokio::sync::Mutex<HashMap<String, Scheduled>>,
}

/// A job's schedule task as [`Schedules`] tracks it.
struct Scheduled {
    /// The job's settings as scheduled.
    settings: String,
    /// Retires the task.
    retire: CancellationToken,
    /// Cancelled when the task has ended (its last run finished).
    ended: CancellationToken,
}

/// A job's settings, to tell a changed job from an unchanged one.
fn settings(job: &super::MirrorJob) -> String {
    format!("{job:?}")
}

impl Schedules {
    pub(crate) fn new(
        mirror: super::Mirror,
        instance: String,
        shutdown: CancellationToken,
    ) -> Schedules {
        Schedules {
            mirror,
            instance,
            clock: Clock::new(),
            tasks: TaskTracker::new(),
            shutdown,
            active: tokio::sync::Mutex::default(),
        }
    }

    /// Brings the schedule tasks in line with the mirror service's jobs: retires the task
    /// of a job that is gone, changed or no longer scheduled (a run in progress finishes
    /// first), starts one for each new or changed job with a schedule, and releases what
    /// jobs that are gone had pinned.
    pub(crate) async fn apply(&self) {
        self.mirror.release_removed_jobs().await;
        let jobs = self.mirror.jobs();
        let mut active = self.active.lock().await;
        let mut retired = HashMap::new();
        active.retain(|name, task| {
            let keep = jobs
                .iter()
                .any(|j| &j.name == name && j.schedule.is_some() && settings(j) == task.settings);
            if !keep {
                tracing::info!(job = %name, "mirror job schedule retired");
                task.retire.cancel();
                retired.insert(name.clone(), task.ended.clone());
            }
            keep
        });
        for job in jobs.iter() {
            let Some(cron) = job.schedule.clone() else {
                continue;
            };
            if active.contains_key(&job.name) {
                continue;
            }
            let offset =
                super::schedule::jitter_offset(&self.instance, &job.name, job.jitter).as_secs();
            let name = job.name.clone();
            tracing::info!(job = %name, schedule = %cron, jitter_s = offset, "mirror job scheduled");
            let run: RunSlot = {
                let (mirror, name) = (self.mirror.clone(), name.clone());
                Arc::new(move |slot| {
                    let (mirror, name) = (mirror.clone(), name.clone());
                    Box::pin(async move { mirror.run_slot(&name, slot).await })
                })
            };
            let last: LastSlot = {
                let mirror = self.mirror.clone();
                Box::pin(async move {
                    mirror.last_slot(&name).await.unwrap_or_else(|e| {
                        tracing::warn!(job = %name, error = %e, "reading the last mirror run failed");
                        None
                    })
                })
            };
            let (retire, ended) = (self.shutdown.child_token(), CancellationToken::new());
            active.insert(
                job.name.clone(),
                Scheduled {
                    settings: settings(job),
                    retire: retire.clone(),
                    ended: ended.clone(),
                },
            );
            let stop = Stop {
                shutdown: self.shutdown.clone(),
                retire,
            };
            let previous = retired.get(&job.name).cloned();
            let clock = self.clock;
            self.tasks.spawn(async move {
                let _ended = ended.drop_guard();
                take_over(previous, last, cron, offset, clock, run, stop).await;
            });
        }
    }

    /// Waits until every schedule task has ended (after shutdown).
    pub(crate) async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// How a schedule task ends: `shutdown` abandons a run in progress (the daemon stops);
/// `retire` (a child of `shutdown`) ends the task once no run is in progress (a reload
/// changed or removed the job).
struct Stop {
    shutdown: CancellationToken,
    retire: CancellationToken,
}

/// Reads the last slot a job ran (its durable run record).
type LastSlot = Pin<Box<dyn Future<Output = Option<u64>> + Send>>;

/// Runs a job's schedule once the task it replaces (`previous` is cancelled when that
/// has ended) has finished its run: the last slot is read only then, so a slot that run
/// was mirroring is not taken for missed and run again.
async fn take_over(
    previous: Option<CancellationToken>,
    last: LastSlot,
    cron: Cron,
    offset: u64,
    clock: Clock,
    run: RunSlot,
    stop: Stop,
) {
    if let Some(previous) = previous {
        previous.cancelled().await;
    }
    schedule_job(cron, offset, last.await, clock, run, stop).await;
}

/// Runs a job's schedule until it is stopped.
async fn schedule_job(
    cron: Cron,
    offset: u64,
    mut last_slot: Option<u64>,
    clock: Clock,
    run: RunSlot,
    stop: Stop,
) {
    loop {
        let Some(plan) = next_run(&cron, offset, last_slot, clock.now_secs()) else {
            return;
        };
        if !sleep_until(&clock, plan.at, &stop.retire).await {
            return;
        }
        let mut attempt = 0;
        loop {
            // Stopping abandons a run: nothing it fetched is visible until its tag
            // flips, and the next start catches the slot up.
            let ok = tokio::select! {
                ok = run(plan.slot) => ok,
                _ = stop.shutdown.cancelled() => return,
            };
            if ok || stop.retire.is_cancelled() {
                break;
            }
            let retry = RETRIES.retry_at(clock.now_secs(), attempt, cron.next_after(plan.slot));
            let Some(at) = retry else {
                break;
            };
            if !sleep_until(&clock, at, &stop.retire).await {
                return;
            }
            attempt += 1;
        }
        last_slot = Some(plan.slot);
    }
}

/// Sleeps until `at` (Unix seconds, as `clock` reads them). `false` if stopped first.
async fn sleep_until(clock: &Clock, at: u64, shutdown: &CancellationToken) -> bool {
    loop {
        let now = clock.now_secs();
        if now >= at {
            return true;
        }
        let wait = Duration::from_secs((at - now).min(MAX_SLEEP));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const DAY: u64 = 86_400;

    fn nightly() -> Cron {
        "0 2 * * *".parse().expect("cron")
    }

    #[test]
    fn plans_the_next_slot_plus_the_offset_and_catches_up_once() {
        let cron = nightly();
        let two_am = cron.next_after(0).expect("slot");
        let day3 = two_am + 3 * DAY;
        // Never ran: the next slot, at the site's offset.
        assert_eq!(
            next_run(&cron, 600, None, day3 - 60),
            Some(Plan {
                slot: day3,
                at: day3 + 600
            })
        );
        // Ran at day 0, off until day 3 past 02:00: one catch-up for day 3's slot, soon.
        assert_eq!(
            next_run(&cron, 600, Some(two_am), day3 + 3600),
            Some(Plan {
                slot: day3,
                at: day3 + 3600 + 300
            })
        );
        // Ran today's slot: tomorrow's.
        assert_eq!(
            next_run(&cron, 600, Some(day3), day3 + 3600),
            Some(Plan {
                slot: day3 + DAY,
                at: day3 + DAY + 600
            })
        );
    }

    fn stops(shutdown: &CancellationToken) -> Stop {
        Stop {
            shutdown: shutdown.clone(),
            retire: shutdown.child_token(),
        }
    }

    /// The slots run, with the (clock) times they started.
    type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

    /// Records the slots run and the (clock) times they started.
    fn recorder(outcomes: Vec<bool>) -> (RunSlot, Seen, Clock) {
        let clock = Clock::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let outcomes = Arc::new(Mutex::new(outcomes.into_iter()));
        let run: RunSlot = {
            let seen = seen.clone();
            Arc::new(move |slot| {
                let (seen, outcomes) = (seen.clone(), outcomes.clone());
                Box::pin(async move {
                    seen.lock().expect("lock").push((slot, clock.now_secs()));
                    outcomes.lock().expect("lock").next().unwrap_or(true)
                })
            })
        };
        (run, seen, clock)
    }

    /// A run that tells the receiver when it first starts, then waits until the
    /// `Notify` lets it go, calls `done` with its slot and succeeds.
    fn held_run(
        done: impl Fn(u64) + Send + Sync + 'static,
    ) -> (
        RunSlot,
        tokio::sync::oneshot::Receiver<()>,
        Arc<tokio::sync::Notify>,
    ) {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let started = Arc::new(Mutex::new(Some(started_tx)));
        let finish = Arc::new(tokio::sync::Notify::new());
        let done = Arc::new(done);
        let run: RunSlot = {
            let finish = finish.clone();
            Arc::new(move |slot| {
                let (started, finish, done) = (started.clone(), finish.clone(), done.clone());
                Box::pin(async move {
                    if let Some(tx) = started.lock().expect("lock").take() {
                        let _ = tx.send(());
                    }
                    finish.notified().await;
                    done(slot);
                    true
                })
            })
        };
        (run, started_rx, finish)
    }

    async fn until_runs(seen: &Seen, n: usize) -> Vec<(u64, u64)> {
        loop {
            let got = seen.lock().expect("lock").clone();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn runs_each_slot_once_at_its_offset_under_paused_time() {
        let (run, seen, clock) = recorder(vec![]);
        let stop = CancellationToken::new();
        let cron = nightly();
        let first = cron.next_after(clock.now_secs()).expect("slot");
        let task = tokio::spawn(schedule_job(cron, 900, None, clock, run, stops(&stop)));
        let got = until_runs(&seen, 2).await;
        stop.cancel();
        let _ = task.await;
        assert_eq!(got[0].0, first);
        assert_eq!(got[1].0, first + DAY, "one run per slot, the next day");
        for (slot, started) in &got[..2] {
            assert!(
                *started >= slot + 900,
                "started {started} before slot {slot} + offset"
            );
            assert!(
                *started < slot + 900 + 60,
                "started {started} long after its time"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_missed_slot_runs_once_soon_after_start_up() {
        let (run, seen, clock) = recorder(vec![]);
        let stop = CancellationToken::new();
        let cron = nightly();
        let now = clock.now_secs();
        let newest = cron.next_after(now - DAY).expect("slot");
        let newest = if newest > now { newest - DAY } else { newest };
        // Last ran four nights ago.
        let last = newest - 4 * DAY;
        let task = tokio::spawn(schedule_job(cron, 60, Some(last), clock, run, stops(&stop)));
        let got = until_runs(&seen, 2).await;
        stop.cancel();
        let _ = task.await;
        assert_eq!(got[0].0, newest, "the newest missed slot, not the oldest");
        assert!(got[0].1 < now + 300, "soon after start-up");
        assert_eq!(
            got[1].0,
            newest + DAY,
            "then the regular schedule, not the other misses"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_run_is_retried_with_backoff_inside_its_window() {
        let (run, seen, clock) = recorder(vec![false, false, true]);
        let stop = CancellationToken::new();
        let cron = nightly();
        let first = cron.next_after(clock.now_secs()).expect("slot");
        let task = tokio::spawn(schedule_job(cron, 0, None, clock, run, stops(&stop)));
        let got = until_runs(&seen, 4).await;
        stop.cancel();
        let _ = task.await;
        let slots: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(slots, vec![first, first, first, first + DAY]);
        let waits: Vec<u64> = got.windows(2).take(2).map(|w| w[1].1 - w[0].1).collect();
        assert!(
            (60..90).contains(&waits[0]) && (120..150).contains(&waits[1]),
            "backoff doubles from one minute: {waits:?}"
        );
    }

    /// A retired schedule lets the run in progress finish, then ends without another.
    #[tokio::test(start_paused = true)]
    async fn a_retired_schedule_finishes_its_run_and_ends() {
        let clock = Clock::new();
        let finished = Arc::new(Mutex::new(0));
        let (run, started_rx, finish) = {
            let finished = finished.clone();
            held_run(move |_| *finished.lock().expect("lock") += 1)
        };
        let shutdown = CancellationToken::new();
        let stop = stops(&shutdown);
        let retire = stop.retire.clone();
        let task = tokio::spawn(schedule_job(nightly(), 0, None, clock, run, stop));
        started_rx.await.expect("the first slot's run started");
        retire.cancel();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!task.is_finished(), "the run in progress was not abandoned");
        finish.notify_one();
        task.await.expect("schedule task");
        assert_eq!(
            *finished.lock().expect("lock"),
            1,
            "finished, and no other run"
        );
    }

    /// Regression: a reload that changed a job mid-run started its new schedule at once,
    /// which read the last slot before the run in progress recorded it, took that slot
    /// for missed and ran it again. The new schedule now starts when the old one ends.
    #[tokio::test(start_paused = true)]
    async fn a_job_changed_mid_run_does_not_run_that_slot_again() {
        let clock = Clock::new();
        let cron = nightly();
        let slot = cron.next_after(clock.now_secs()).expect("slot");
        // The durable record: the night before, until the run of `slot` ends.
        let recorded = Arc::new(Mutex::new(Some(slot - DAY)));
        let (old_run, started_rx, finish) = {
            let recorded = recorded.clone();
            held_run(move |run_slot| *recorded.lock().expect("lock") = Some(run_slot))
        };
        let shutdown = CancellationToken::new();
        let old_stop = stops(&shutdown);
        let retire = old_stop.retire.clone();
        let ended = CancellationToken::new();
        let old = {
            let (ended, cron) = (ended.clone(), cron.clone());
            tokio::spawn(async move {
                let _ended = ended.drop_guard();
                schedule_job(cron, 0, Some(slot - DAY), clock, old_run, old_stop).await;
            })
        };
        started_rx.await.expect("the slot's run started");
        retire.cancel();
        let (new_run, seen, _) = recorder(vec![]);
        let last: LastSlot = {
            let recorded = recorded.clone();
            Box::pin(async move { *recorded.lock().expect("lock") })
        };
        let new = tokio::spawn(take_over(
            Some(ended),
            last,
            cron,
            0,
            clock,
            new_run,
            stops(&shutdown),
        ));
        tokio::time::sleep(Duration::from_secs(600)).await;
        finish.notify_one();
        old.await.expect("old schedule task");
        let got = until_runs(&seen, 1).await;
        shutdown.cancel();
        new.await.expect("new schedule task");
        assert_eq!(
            got[0].0,
            slot + DAY,
            "the new schedule starts with the next night, not the slot just run"
        );
    }

    /// A reload's jobs: a job whose schedule moved runs at the new time only, a removed
    /// job no more, an added one at its slot.
    #[tokio::test(start_paused = true)]
    async fn a_reload_moves_retires_and_adds_schedules() {
        use crate::config::Config;
        use crate::metrics::Metrics;
        use crate::storage::Store;
        use crate::upstream::Upstreams;

        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path(), 1 << 20).expect("store");
        let config = |jobs: &[(&str, &str)]| {
            let jobs: String = jobs
                .iter()
                .map(|(name, cron)| {
                    format!(
                        "[[mirror]]\nname=\"{name}\"\nupstream=\"central.corp\"\n\
                         repositories=[\"team/app\"]\ntags=[\"v*\"]\n\
                         schedule=\"{cron}\"\njitter=\"0s\"\n"
                    )
                })
                .collect();
            // Nothing listens there: every run fails at once, and is recorded.
            Config::from_toml(&format!(
                "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\n\
                 [storage]\npath=\"x\"\n\
                 [[upstream]]\nname=\"central.corp\"\nurl=\"http://127.0.0.1:1\"\n{jobs}"
            ))
            .expect("config")
        };
        let before = config(&[("moved", "0 2 * * *"), ("removed", "0 2 * * *")]);
        let upstreams = Upstreams::new(&before).expect("upstreams");
        let mirror = super::super::Mirror::new(
            store,
            upstreams,
            before.mirrors.clone(),
            Arc::new(Metrics::new()),
            None,
        );
        let shutdown = CancellationToken::new();
        let schedules = Schedules::new(mirror.clone(), "site".to_owned(), shutdown.clone());
        schedules.apply().await;

        let after = config(&[("moved", "0 3 * * *"), ("added", "30 2 * * *")]);
        mirror.set_jobs(after.mirrors.clone());
        schedules.apply().await;

        let clock = Clock::new();
        let two = nightly().next_after(clock.now_secs()).expect("02:00");
        let until = |at: u64| Duration::from_secs(at - clock.now_secs());
        tokio::time::sleep(until(two + 2700)).await;
        assert_eq!(mirror.last_slot("moved").await.expect("read"), None);
        assert_eq!(mirror.last_slot("removed").await.expect("read"), None);
        assert_eq!(
            mirror.last_slot("added").await.expect("read"),
            Some(two + 1800)
        );
        tokio::time::sleep(until(two + 3600 + 1800)).await;
        assert_eq!(
            mirror.last_slot("moved").await.expect("read"),
            Some(two + 3600),
            "at its new time"
        );
        shutdown.cancel();
        schedules.wait().await;
    }
}
