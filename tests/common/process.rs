//! Child processes for the harness: daemons whose output is captured line by line and who
//! are always reaped (SIGTERM with a bounded grace period, then SIGKILL, and SIGKILL on
//! drop), and one-shot commands that can never hang a test.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines a daemon printed on stdout and stderr, interleaved as they arrived. Shared, so that
/// a log can outlive one process and collect the lines of its restarts too.
pub type SharedLog = Arc<Mutex<Vec<String>>>;

/// A long-running child process; killed on drop.
pub struct Daemon {
    name: String,
    child: Option<Child>,
}

impl Daemon {
    /// Spawns `cmd` with stdout and stderr appended, line by line, to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: SharedLog) -> Daemon {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        // The reader threads end when the pipes close, that is when the process exits.
        for pipe in [Box::new(out) as Box<dyn Read + Send>, Box::new(err)] {
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut l) = sink.lock() {
                        l.push(line);
                    }
                }
            });
        }
        Daemon {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (not yet exited, or exited but unreaped).
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGTERM, wait up to `grace` for a clean exit, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} ignored SIGTERM for {grace:?}; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL, like a power cut for the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion, or kills it after `timeout` (then the status is a failure and
/// stderr ends with a line saying so). Stdin is closed.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (status, false),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                break (child.wait().expect("wait for killed child"), true);
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let mut stderr = err.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(
            format!("\n[harness: {program} killed after {timeout:?}]\n").as_bytes(),
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Polls `ready` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago on 127.0.0.1, for servers that must be told their port
/// before they start (the short race with other processes is acceptable in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}
