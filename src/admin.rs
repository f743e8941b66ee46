//! The local admin channel: commands on the store (`key revoke`, `key list`, recording an
//! issued key, `gc`, `fsck`) reach a running daemon through a unix socket in the storage
//! directory, because redb allows one process per database.
//!
//! The socket is created with mode 0600, so only the daemon's own user (and root) can
//! use it: file permissions are the authentication. One JSON line each way per
//! connection. The same [`execute`] runs the command whether the CLI opened the store
//! itself (daemon stopped) or the daemon runs it on the CLI's behalf.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::auth::keyring;
use crate::config::Config;
use crate::mirror::Mirror;
use crate::mirror::progress::Event;
use crate::storage::{KeyRecord, Store, now_secs};

/// Largest request line accepted: room for the claims of the largest API key.
const MAX_REQUEST: u64 = 16 * 1024;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A command for the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AdminRequest {
    Revoke {
        key_id: String,
    },
    /// `outpost key list`; `json` picks JSON over the table.
    ListKeys {
        json: bool,
    },
    /// `outpost key issue --config`: the new key's claims (never the key).
    RecordKey {
        key_id: String,
        record: KeyRecord,
    },
    Gc,
    Fsck {
        repair: bool,
    },
    /// `outpost mirror run`: the jobs named (all when empty), run by the daemon.
    MirrorRun {
        jobs: Vec<String>,
    },
    /// `outpost mirror status`.
    MirrorStatus {
        json: bool,
    },
}

/// One line from the daemon: a mirror run's progress as it happens, then the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AdminLine {
    Progress { progress: Event },
    Reply(AdminReply),
}

/// The command's output and whether it found problems.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminReply {
    pub output: String,
    pub failed: bool,
}

/// Where the admin socket of the store at `config` lives.
pub fn socket_path(config: &Config) -> PathBuf {
    config.storage.path.join("admin.sock")
}

/// Runs `request` against an open store. Blocking (gc and fsck read every blob).
/// `daemon`, when given, is the running daemon's authenticator: revocations reach its
/// set at once, and its batched key use is recorded before a listing.
pub fn execute(
    store: &Store,
    config: &Config,
    daemon: Option<&Authenticator>,
    request: &AdminRequest,
) -> anyhow::Result<AdminReply> {
    match request {
        AdminRequest::Revoke { key_id } => {
            let new = store.revoke_key_blocking(key_id)?;
            if let Some(auth) = daemon {
                auth.revocations().revoke(key_id);
            }
            Ok(AdminReply {
                output: if new {
                    format!("revoked {key_id}\n")
                } else {
                    format!("{key_id} was already revoked\n")
                },
                failed: false,
            })
        }
        AdminRequest::ListKeys { json } => {
            let listing = keyring::listing(store, daemon, config.auth.revocation_file.as_deref())?;
            let now = now_secs();
            Ok(AdminReply {
                output: if *json {
                    listing.json(now)
                } else {
                    listing.table(now)
                },
                failed: false,
            })
        }
        AdminRequest::RecordKey { key_id, record } => {
            keyring::record_issued(store, key_id, record)?;
            Ok(AdminReply {
                output: format!(
                    "recorded {key_id} in the key list of {}\n",
                    config.storage.path.display()
                ),
                failed: false,
            })
        }
        AdminRequest::MirrorStatus { json } => Ok(AdminReply {
            output: crate::mirror::status(
                &config.mirrors,
                &store.mirror_runs()?,
                std::fs::read_to_string(config.storage.path.join("instance.id"))
                    .ok()
                    .as_deref()
                    .map(str::trim),
                now_secs(),
                *json,
            ),
            failed: false,
        }),
        AdminRequest::MirrorRun { .. } => Ok(AdminReply {
            output: "error: mirror runs need the daemon's mirror service\n".to_owned(),
            failed: true,
        }),
        AdminRequest::Gc => {
            let r = store.gc(config.storage.gc_grace, config.storage.upload_timeout)?;
            Ok(AdminReply {
                output: format!(
                    "removed {} blob(s) ({} bytes), {} manifest(s), {} link(s), {} upload(s), {} stray file(s)\n",
                    r.blobs_removed,
                    r.bytes_freed,
                    r.manifests_removed,
                    r.links_removed,
                    r.uploads_removed,
                    r.stray_files_removed
                ),
                failed: false,
            })
        }
        AdminRequest::Fsck { repair } => {
            let r = store.fsck(*repair)?;
            let mut out = String::new();
            for p in &r.problems {
                out.push_str(&format!("problem: {p}\n"));
            }
            for o in &r.orphans {
                out.push_str(&format!("unreferenced blob file (gc removes it): {o}\n"));
            }
            out.push_str(&format!(
                "checked {} blob(s) and {} manifest(s): {} problem(s){}\n",
                r.blobs_checked,
                r.manifests_checked,
                r.problems.len(),
                if *repair {
                    format!(", {} record(s) repaired", r.repaired)
                } else {
                    String::new()
                }
            ));
            Ok(AdminReply {
                output: out,
                failed: !r.problems.is_empty() && !repair,
            })
        }
    }
}

/// Serves the admin socket until `shutdown`. The socket file is replaced if left over
/// (the caller holds the database lock, so no other daemon owns it) and removed at the end.
pub async fn serve(
    path: PathBuf,
    store: Store,
    config: crate::app::Applied,
    auth: Authenticator,
    mirror: Mirror,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Each request sees the configuration in force (a reload may have replaced it).
        let config = config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (store, auth, mirror) = (store.clone(), auth.clone(), mirror.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, store, config, auth, mirror).await {
                tracing::warn!(error = %e, "admin request failed");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(
    stream: UnixStream,
    store: Store,
    config: std::sync::Arc<Config>,
    auth: Authenticator,
    mirror: Mirror,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await??;
    let reply = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(AdminRequest::MirrorRun { jobs }) => {
            tracing::info!(command = "mirror_run", "admin command");
            let (tx, rx) = mpsc::unbounded_channel();
            let run = async move {
                let reply = run_mirror(&mirror, &jobs, Some(&tx)).await;
                drop(tx);
                reply
            };
            tokio::join!(run, forward_progress(rx, &mut write)).0
        }
        Ok(request) => {
            tracing::info!(command = ?command_name(&request), "admin command");
            tokio::task::spawn_blocking(move || execute(&store, &config, Some(&auth), &request))
                .await?
                .unwrap_or_else(|e| AdminReply {
                    output: format!("error: {e:#}\n"),
                    failed: true,
                })
        }
        Err(e) => AdminReply {
            output: format!("error: bad admin request: {e}\n"),
            failed: true,
        },
    };
    let mut out = serde_json::to_vec(&AdminLine::Reply(reply))?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// How often byte counts of a mirror run are sent at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Sends a mirror run's progress to the CLI as it happens, byte counts gathered up. A
/// CLI that went away does not stop the run: its events are drained unsent.
async fn forward_progress(mut rx: mpsc::UnboundedReceiver<Event>, write: &mut OwnedWriteHalf) {
    let mut pending: BTreeMap<String, u64> = BTreeMap::new();
    let mut last = tokio::time::Instant::now();
    let mut gone = false;
    let send = async |write: &mut OwnedWriteHalf, event: Event| {
        let Ok(mut line) = serde_json::to_vec(&AdminLine::Progress { progress: event }) else {
            return false;
        };
        line.push(b'\n');
        write.write_all(&line).await.is_ok()
    };
    loop {
        let event = rx.recv().await;
        let flush = match &event {
            Some(Event::Bytes { job, bytes }) => {
                *pending.entry(job.clone()).or_default() += bytes;
                last.elapsed() >= PROGRESS_EVERY
            }
            _ => true,
        };
        if flush && !gone {
            for (job, bytes) in std::mem::take(&mut pending) {
                gone |= !send(write, Event::Bytes { job, bytes }).await;
            }
            last = tokio::time::Instant::now();
        }
        match event {
            None => return,
            Some(Event::Bytes { .. }) => {}
            Some(e) => {
                if !gone {
                    gone |= !send(write, e).await;
                }
            }
        }
    }
}

/// The command's name for the log (never its arguments).
fn command_name(request: &AdminRequest) -> &'static str {
    match request {
        AdminRequest::Revoke { .. } => "revoke",
        AdminRequest::ListKeys { .. } => "list_keys",
        AdminRequest::RecordKey { .. } => "record_key",
        AdminRequest::Gc => "gc",
        AdminRequest::Fsck { .. } => "fsck",
        AdminRequest::MirrorRun { .. } => "mirror_run",
        AdminRequest::MirrorStatus { .. } => "mirror_status",
    }
}

/// Runs mirror jobs, telling `progress`, and words the outcome as a reply.
pub async fn run_mirror(
    mirror: &Mirror,
    jobs: &[String],
    progress: Option<&mpsc::UnboundedSender<Event>>,
) -> AdminReply {
    match mirror.run(jobs, progress).await {
        Ok(reports) => {
            let (output, failed) = crate::mirror::summary(&reports);
            AdminReply { output, failed }
        }
        Err(e) => AdminReply {
            output: format!("error: {e}\n"),
            failed: true,
        },
    }
}

/// How long a CLI command waits for a daemon that holds the store but has not opened
/// its admin socket yet (it is starting; or the socket is a dead daemon's, not replaced).
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Connects to the admin socket at `path`, waiting up to [`CONNECT_WAIT`] while it is
/// missing or refuses (a daemon starting up). Other errors (permissions) fail at once.
fn connect(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    let deadline = std::time::Instant::now() + CONNECT_WAIT;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Sends `request` to the daemon listening on `path` and waits for its reply.
pub fn request(path: &Path, request: &AdminRequest) -> anyhow::Result<AdminReply> {
    request_with_progress(path, request, |_| {})
}

/// Sends `request` to the daemon listening on `path`, hands each progress event to
/// `progress` as it comes, and returns the reply.
pub fn request_with_progress(
    path: &Path,
    request: &AdminRequest,
    mut progress: impl FnMut(&Event),
) -> anyhow::Result<AdminReply> {
    use std::io::{BufRead, Write};
    let mut stream = connect(path).map_err(|e| {
        anyhow::anyhow!(
            "the store is in use by a running daemon, and its admin socket {} cannot be \
             reached ({e}); run this as the daemon's user",
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = std::io::BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            anyhow::bail!("the daemon closed the admin connection without a reply");
        }
        match serde_json::from_str(&line)? {
            AdminLine::Progress { progress: e } => progress(&e),
            AdminLine::Reply(reply) => return Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let r = AdminRequest::Revoke {
            key_id: "ab12".into(),
        };
        let json = serde_json::to_string(&r).expect("serialize");
        assert_eq!(json, r#"{"command":"revoke","key_id":"ab12"}"#);
        assert_eq!(serde_json::from_str::<AdminRequest>(&json).ok(), Some(r));
        assert_eq!(
            serde_json::from_str::<AdminRequest>(r#"{"command":"fsck","repair":true}"#).ok(),
            Some(AdminRequest::Fsck { repair: true })
        );
        assert!(serde_json::from_str::<AdminRequest>(r#"{"command":"rm -rf"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<AdminRequest>(r#"{"command":"list_keys","json":true}"#).ok(),
            Some(AdminRequest::ListKeys { json: true })
        );
        let record = AdminRequest::RecordKey {
            key_id: "ab".repeat(16),
            record: KeyRecord {
                subject: "ci".into(),
                issuer: "0123456789abcdef".into(),
                repos: vec!["team/**".into()],
                actions: "pull".into(),
                issued_at: 1,
                expires_at: 2,
                recorded_at: 1,
                last_used: None,
            },
        };
        let json = serde_json::to_string(&record).expect("serialize");
        assert!(json.len() < MAX_REQUEST as usize);
        assert_eq!(
            serde_json::from_str::<AdminRequest>(&json).ok(),
            Some(record)
        );
    }
}
