//! The in-process tier: the daemon started through the library (`Daemon::start_with`) on
//! a listener the test bound itself, on a runtime of its own in a thread of its own.
//!
//! - No port race: the test binds `127.0.0.1:0`, writes the bound address into the
//!   config's `public_url`, and hands the same listener to the daemon.
//! - No log scraping for the address: it comes from the daemon.
//! - A runtime of its own, so a test may block (skopeo, ctr, `std::process`) without
//!   starving the server, whatever runtime flavour the test itself uses.
//! - Logs: everything the daemon traces (filter given) is captured for `Server::logs`.
//! - Always stopped: `stop` drains like SIGTERM; dropping the handle does the same.

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use outpost::Listeners;
use outpost::app::Daemon;
use outpost::config::Config;

/// A daemon running in this process.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Appends what the daemon's tracing subscriber writes to a shared string.
#[derive(Clone)]
struct Capture(Arc<Mutex<String>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut log) = self.0.lock() {
            log.push_str(&String::from_utf8_lossy(buf));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl InProcess {
    /// Starts the daemon on `config`: on `listener` when given (its address is the
    /// config's), otherwise on the config's own `listen` addresses. Returns once it
    /// serves, with the address of its first plain listener.
    pub fn start(
        config: &Path,
        listener: Option<StdListener>,
        filter: &str,
        log: Arc<Mutex<String>>,
    ) -> Result<(InProcess, String), String> {
        let config = Config::load(config).map_err(|e| e.to_string())?;
        let capture = Capture(log);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(move || capture.clone())
            .with_ansi(false)
            .finish();
        let dispatch = tracing::Dispatch::new(subscriber);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let on_worker = dispatch.clone();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                // Every thread of this runtime (workers and the blocking pool) logs into
                // this server's capture. The guard lives as long as the thread.
                .on_thread_start(move || {
                    std::mem::forget(tracing::dispatcher::set_default(&on_worker));
                })
                .build();
            let runtime = match runtime {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            let _guard = tracing::dispatcher::set_default(&dispatch);
            runtime.block_on(async move {
                let started = match listener {
                    Some(l) => {
                        let plain = l
                            .set_nonblocking(true)
                            .and_then(|()| tokio::net::TcpListener::from_std(l));
                        match plain {
                            Ok(l) => {
                                let listeners = Listeners {
                                    plain: vec![l],
                                    tls: Vec::new(),
                                };
                                Daemon::start_with(config, listeners).await
                            }
                            Err(e) => Err(e.into()),
                        }
                    }
                    None => Daemon::start(config).await,
                };
                let daemon = match started {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                let addr = daemon.local_addrs().first().map(ToString::to_string);
                let _ = ready_tx.send(addr.ok_or_else(|| "no plain listener".to_owned()));
                // Stop when told, or when the handle is gone.
                let _ = stop_rx.await;
                daemon.stop().await;
            });
        });
        let addr = ready_rx
            .recv()
            .map_err(|_| "the daemon thread ended before it served".to_owned())
            .and_then(|r| r);
        match addr {
            Ok(addr) => Ok((
                InProcess {
                    stop: Some(stop_tx),
                    thread: Some(thread),
                },
                addr,
            )),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// Stops accepting, drains (bounded by the daemon's grace period) and waits.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
