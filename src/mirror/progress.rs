//! Live progress of a mirror run: the [`Event`]s the engine sends while it works, and
//! [`Display`], which shows them to the person who typed `outpost mirror run`: bars on a
//! terminal (per job: tags done of selected, blobs, bytes, rate, ETA), plain lines
//! otherwise. Events cross the admin socket as JSON when the daemon does the work.
//!
//! Must not decide anything: a run behaves the same whether anyone watches.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Something a run did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Job `job` started.
    Started { job: String },
    /// `tags` more tags were selected (one repository's worth).
    Selected { job: String, tags: u64 },
    /// A selected tag is done: `added`, `updated`, `unchanged`, or `failed: <why>`.
    Tag {
        job: String,
        tag: String,
        outcome: String,
    },
    /// One more blob fetched.
    Blob { job: String },
    /// Bytes received from the upstream.
    Bytes { job: String, bytes: u64 },
    /// Job `job` ended.
    Finished { job: String, ok: bool },
}

/// Where the engine sends events; dropping every sender ends the stream.
pub type Sender = mpsc::UnboundedSender<Event>;

/// Sends `event` if anyone listens.
pub(super) fn send(to: Option<&Sender>, event: impl FnOnce() -> Event) {
    if let Some(to) = to {
        let _ = to.send(event());
    }
}

/// Shows events as they come: bars on a terminal, lines otherwise.
pub struct Display {
    bars: Option<MultiProgress>,
    jobs: HashMap<String, Job>,
}

/// What is shown of one job.
struct Job {
    bar: Option<ProgressBar>,
    blobs: u64,
    bytes: u64,
    started: Instant,
}

impl Display {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Display {
        let terminal = std::io::stderr().is_terminal();
        Display {
            bars: terminal
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4))),
            jobs: HashMap::new(),
        }
    }

    pub fn show(&mut self, event: &Event) {
        match event {
            Event::Started { job } => {
                let bar = self.bars.as_ref().map(|m| {
                    let bar = m.add(ProgressBar::new(0));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix:>12} [{bar:24}] {pos}/{len} tags  {msg}  ETA {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(job.clone());
                    bar.enable_steady_tick(Duration::from_millis(250));
                    bar
                });
                if bar.is_none() {
                    line(format_args!("{job}: started"));
                }
                self.jobs.insert(
                    job.clone(),
                    Job {
                        bar,
                        blobs: 0,
                        bytes: 0,
                        started: Instant::now(),
                    },
                );
            }
            Event::Selected { job, tags } => {
                if let Some(bar) = self.job(job).and_then(|j| j.bar.as_ref()) {
                    bar.inc_length(*tags);
                }
            }
            Event::Tag { job, tag, outcome } => {
                if let Some(j) = self.job(job) {
                    match &j.bar {
                        Some(bar) => {
                            bar.inc(1);
                            if outcome.starts_with("failed") {
                                bar.println(format!("{job}: {tag}: {outcome}"));
                            }
                        }
                        None => line(format_args!("{job}: {tag}: {outcome}")),
                    }
                }
            }
            Event::Blob { job } => {
                if let Some(j) = self.job(job) {
                    j.blobs += 1;
                    j.refresh();
                }
            }
            Event::Bytes { job, bytes } => {
                if let Some(j) = self.job(job) {
                    j.bytes += bytes;
                    j.refresh();
                }
            }
            Event::Finished { job, ok } => {
                if let Some(j) = self.jobs.remove(job) {
                    match &j.bar {
                        Some(bar) => {
                            j.bar_message(bar);
                            bar.finish();
                        }
                        None => line(format_args!(
                            "{job}: {} ({} blobs, {} fetched)",
                            if *ok { "done" } else { "FAILED" },
                            j.blobs,
                            human_bytes(j.bytes)
                        )),
                    }
                }
            }
        }
    }

    fn job(&mut self, job: &str) -> Option<&mut Job> {
        self.jobs.get_mut(job)
    }
}

impl Default for Display {
    fn default() -> Display {
        Display::new()
    }
}

impl Job {
    fn refresh(&self) {
        if let Some(bar) = &self.bar {
            self.bar_message(bar);
        }
    }

    fn bar_message(&self, bar: &ProgressBar) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        bar.set_message(format!(
            "{} blobs  {}  {}/s",
            self.blobs,
            human_bytes(self.bytes),
            human_bytes((self.bytes as f64 / secs) as u64)
        ));
    }
}

fn line(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{args}");
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_cross_the_admin_socket_as_tagged_json() {
        let e = Event::Tag {
            job: "apps".into(),
            tag: "team/app:v1".into(),
            outcome: "added".into(),
        };
        let json = serde_json::to_string(&e).expect("json");
        assert_eq!(
            json,
            r#"{"event":"tag","job":"apps","tag":"team/app:v1","outcome":"added"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&json).ok(), Some(e));
    }

    #[test]
    fn sizes_read_like_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(150 << 20), "150.0 MiB");
    }
}
