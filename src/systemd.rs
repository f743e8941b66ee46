//! systemd integration: service notifications (`sd_notify`) and where logs go.
//!
//! Owns everything Outpost reads from the environment systemd gives a service
//! (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`, `JOURNAL_STREAM`) and everything it
//! sends back: state changes and watchdog pings on the notification socket, and log records
//! to journald. Outside systemd every notification is a no-op and logs are readable lines
//! on stderr.
//!
//! It decides nothing about the lifecycle: `app` says when the daemon is ready, reloading
//! or stopping. As with `sd_notify(3)`, a failed notification is logged and never fatal.
//! Status lines and log fields carry what the daemon is doing, never a credential.
//!
//! The notification protocol is a few `KEY=value` lines in one datagram to a Unix socket,
//! so it is spoken here directly with [`UnixDatagram`] rather than through a crate.

use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::io;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use systemd_journal_logger::JournalLog;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

// ---------------------------------------------------------------------------------------
// Service notifications
// ---------------------------------------------------------------------------------------

/// A send that would block longer than this is given up: systemd drains the notification
/// socket promptly, and the daemon must not hang on it.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// What systemd put in the environment for notifications, read once at start.
#[derive(Debug, Default, Clone)]
pub struct NotifyEnv {
    /// `NOTIFY_SOCKET`: a socket path, or `@name` for an abstract socket.
    pub notify_socket: Option<OsString>,
    /// `WATCHDOG_USEC`: the watchdog timeout in microseconds.
    pub watchdog_usec: Option<OsString>,
    /// `WATCHDOG_PID`: the process the watchdog settings are meant for.
    pub watchdog_pid: Option<OsString>,
}

impl NotifyEnv {
    /// Reads the variables from this process's environment.
    pub fn from_process() -> NotifyEnv {
        NotifyEnv {
            notify_socket: std::env::var_os("NOTIFY_SOCKET"),
            watchdog_usec: std::env::var_os("WATCHDOG_USEC"),
            watchdog_pid: std::env::var_os("WATCHDOG_PID"),
        }
    }
}

/// Sends state changes to systemd. Cheap to clone; a disabled notifier (not started by
/// systemd with `Type=notify`) does nothing.
#[derive(Clone, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
    watchdog: Option<Duration>,
}

struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("enabled", &self.target.is_some())
            .field("watchdog", &self.watchdog)
            .finish()
    }
}

impl Notifier {
    /// A notifier for this process's environment.
    pub fn from_env() -> Notifier {
        Notifier::new(&NotifyEnv::from_process(), std::process::id())
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// A notifier for `env`, as seen by process `pid`. A socket address that cannot be used
    /// is logged and disables notifications rather than failing start-up.
    pub fn new(env: &NotifyEnv, pid: u32) -> Notifier {
        let Some(raw) = env.notify_socket.as_deref().filter(|s| !s.is_empty()) else {
            return Notifier::disabled();
        };
        let target = socket_addr(raw.as_bytes()).and_then(|addr| {
            let socket = UnixDatagram::unbound()?;
            socket.set_write_timeout(Some(SEND_TIMEOUT))?;
            Ok(Target { socket, addr })
        });
        match target {
            Ok(target) => Notifier {
                target: Some(Arc::new(target)),
                watchdog: watchdog_interval(env, pid),
            },
            Err(e) => {
                tracing::warn!(
                    socket = %raw.to_string_lossy(),
                    error = %e,
                    "NOTIFY_SOCKET is not usable; systemd will not be notified"
                );
                Notifier::disabled()
            }
        }
    }

    /// Whether notifications are sent at all.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often the watchdog task pings: half of `WATCHDOG_USEC`, if the watchdog is on
    /// and meant for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1`: start-up (or a reload) is complete and the daemon serves.
    pub fn ready(&self, status: &str) {
        self.send(&[("READY", "1"), ("STATUS", status)]);
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` systemd uses to order it; follow it with
    /// [`Notifier::ready`] when the reload is done.
    pub fn reloading(&self, status: &str) {
        let now = monotonic_usec().to_string();
        self.send(&[
            ("RELOADING", "1"),
            ("MONOTONIC_USEC", &now),
            ("STATUS", status),
        ]);
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.send(&[("STOPPING", "1"), ("STATUS", status)]);
    }

    /// A free-form `STATUS=` line, shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&[("STATUS", status)]);
    }

    /// Starts the task that sends `WATCHDOG=1` every [`Notifier::watchdog_interval`] until
    /// `stop` is cancelled. `None` when the watchdog is off. The pings come from a task on
    /// the daemon's runtime, so a wedged runtime stops them and systemd restarts us.
    pub fn spawn_watchdog(&self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let interval = self.watchdog?;
        let notifier = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = notifier.try_send(&[("WATCHDOG", "1")]) {
                            tracing::warn!(error = %e, "watchdog ping to systemd failed");
                        }
                    }
                }
            }
        }))
    }

    fn send(&self, fields: &[(&str, &str)]) {
        if let Err(e) = self.try_send(fields) {
            tracing::warn!(error = %e, "notifying systemd failed");
        }
    }

    fn try_send(&self, fields: &[(&str, &str)]) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let message = notify_message(fields);
        // A datagram is sent whole or not at all; a short count cannot happen here.
        target
            .socket
            .send_to_addr(message.as_bytes(), &target.addr)
            .map(drop)
    }
}

/// Turns `$NOTIFY_SOCKET` into an address: an absolute path, or `@name` for a Linux
/// abstract socket (the `@` stands for the leading NUL byte).
fn socket_addr(raw: &[u8]) -> io::Result<SocketAddr> {
    match raw {
        [b'@', name @ ..] => abstract_addr(name),
        [b'/', ..] => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(raw)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected an absolute path or @abstract-name",
        )),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// The watchdog ping interval: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
/// recommends, and only if `WATCHDOG_PID` is unset or names `pid` (the variables may have
/// been inherited from a parent that systemd watches).
fn watchdog_interval(env: &NotifyEnv, pid: u32) -> Option<Duration> {
    let usec: u64 = env
        .watchdog_usec
        .as_deref()?
        .to_str()?
        .trim()
        .parse()
        .ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(for_pid) = env.watchdog_pid.as_deref() {
        let for_pid: u32 = for_pid.to_str()?.trim().parse().ok()?;
        if for_pid != pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// One notification datagram: `KEY=value` lines. A value never spans lines (a newline
/// would start a new assignment), so newlines in it become spaces.
fn notify_message(fields: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (key, value) in fields {
        out.push_str(key);
        out.push('=');
        out.extend(
            value
                .chars()
                .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
        );
        out.push('\n');
    }
    out
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let micros = u64::try_from(t.tv_nsec / 1_000).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(micros)
}

// ---------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------

/// Where [`init_logging`] sent the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    /// Structured records to journald.
    Journal,
    /// Readable lines on stderr (coloured only on a terminal).
    Stderr,
}

/// Installs the process-wide tracing subscriber, filtered by `OUTPOST_LOG` (default
/// `info`). When systemd connected stderr to the journal (`JOURNAL_STREAM` names stderr's
/// device and inode), records go to journald with their fields as journal fields;
/// otherwise, or if journald cannot be reached, lines go to stderr: readable text, or
/// one JSON object per line with `OUTPOST_LOG_FORMAT=json` (for log shippers).
pub fn init_logging() -> LogSink {
    let filter = EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let format = std::env::var("OUTPOST_LOG_FORMAT").unwrap_or_default();
    let json = format.eq_ignore_ascii_case("json");
    let bad_format =
        (!json && !format.is_empty() && !format.eq_ignore_ascii_case("text")).then_some(format);
    let mut journal_error = None;
    let journal = if systemd_journal_logger::connected_to_journal() {
        JournalLog::new().map_err(|e| journal_error = Some(e)).ok()
    } else {
        None
    };
    let registry = tracing_subscriber::registry().with(filter);
    // try_init fails only if a subscriber is already installed (a test harness, say);
    // that one is kept.
    let sink = match journal {
        Some(journal) => {
            let _ = registry.with(JournalLayer::new(journal)).try_init();
            LogSink::Journal
        }
        None if json => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(false)
                        .with_writer(io::stderr),
                )
                .try_init();
            LogSink::Stderr
        }
        None => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(io::stderr)
                        .with_ansi(io::stderr().is_terminal()),
                )
                .try_init();
            LogSink::Stderr
        }
    };
    if let Some(other) = bad_format {
        tracing::warn!(value = %other, "OUTPOST_LOG_FORMAT must be text or json; using text");
    }
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "stderr is the journal but journald is unreachable; logging to stderr");
    }
    sink
}

/// A tracing layer that sends each event to journald as one record: the message followed
/// by its fields as `MESSAGE` (what `journalctl` shows), each field of the event and of
/// its enclosing spans as a journal field of its own (`request_id` → `REQUEST_ID`), the
/// level as `PRIORITY` (error 3, warn 4, info 5, debug 6, trace 7, systemd-journal-logger's
/// mapping), and the source location.
struct JournalLayer {
    sink: Sink,
}

enum Sink {
    Journal(JournalLog),
    #[cfg(test)]
    Capture(Arc<std::sync::Mutex<Vec<JournalEntry>>>),
}

impl JournalLayer {
    fn new(journal: JournalLog) -> JournalLayer {
        JournalLayer {
            sink: Sink::Journal(journal),
        }
    }
}

/// One record on its way to journald.
#[derive(Debug, Clone, PartialEq)]
struct JournalEntry {
    level: Level,
    message: String,
    /// Journal field names (already valid) and values, in the order first seen.
    fields: Vec<(String, String)>,
}

/// Field names journald or systemd-journal-logger give a meaning of their own; a tracing
/// field that maps to one of them gets an `OUTPOST_` prefix instead of overriding it.
const RESERVED_FIELDS: &[&str] = &[
    "MESSAGE",
    "MESSAGE_ID",
    "PRIORITY",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_FUNC",
    "CODE_MODULE",
    "ERRNO",
    "INVOCATION_ID",
    "USER_INVOCATION_ID",
    "SYSLOG_FACILITY",
    "SYSLOG_IDENTIFIER",
    "SYSLOG_PID",
    "SYSLOG_TIMESTAMP",
    "SYSLOG_RAW",
    "DOCUMENTATION",
    "TARGET",
    "TID",
    "UNIT",
    "USER_UNIT",
];

/// A tracing field name as a journal field name: ASCII uppercase letters, digits and `_`,
/// starting with a letter, at most 64 bytes, and not one of [`RESERVED_FIELDS`].
fn journal_field_name(name: &str) -> String {
    let mut key: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if !key.starts_with(|c: char| c.is_ascii_uppercase()) || RESERVED_FIELDS.contains(&&*key) {
        key.insert_str(0, "OUTPOST_");
    }
    // Only ASCII is left, so any byte index is a character boundary.
    key.truncate(64);
    key
}

/// Fields recorded from a span or an event. The `message` field is kept apart; a field
/// recorded again (`Span::record`, or an event repeating a span's field) replaces the value.
#[derive(Default, Clone)]
struct Fields {
    message: Option<String>,
    pairs: Vec<(&'static str, String)>,
}

impl Fields {
    fn put(&mut self, name: &'static str, value: String) {
        if name == "message" {
            self.message = Some(value);
        } else if let Some(slot) = self.pairs.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            self.pairs.push((name, value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field.name(), value.to_owned());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(e) = source {
            let _ = write!(text, ": {e}");
            source = e.source();
        }
        self.put(field.name(), text);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field.name(), format!("{value:?}"));
    }
}

/// The readable `MESSAGE`: the event's message, then `name=value` for every field, values
/// quoted when they are empty or contain spaces, quotes or `=`.
fn message_line(message: Option<&str>, pairs: &[(&'static str, String)]) -> String {
    let mut line = message.unwrap_or_default().to_owned();
    for (name, value) in pairs {
        if !line.is_empty() {
            line.push(' ');
        }
        let needs_quotes = value.is_empty()
            || value
                .chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '=');
        if needs_quotes {
            let _ = write!(line, "{name}={value:?}");
        } else {
            let _ = write!(line, "{name}={value}");
        }
    }
    line
}

impl<S> Layer<S> for JournalLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            if let Some(fields) = extensions.get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // Outermost span first, so that inner spans and the event itself win on a clash.
        let mut fields = Fields::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(span_fields) = span.extensions().get::<Fields>() {
                    for (name, value) in &span_fields.pairs {
                        fields.put(name, value.clone());
                    }
                }
            }
        }
        event.record(&mut fields);
        let meta = event.metadata();
        let entry = JournalEntry {
            level: *meta.level(),
            message: message_line(fields.message.as_deref(), &fields.pairs),
            fields: fields
                .pairs
                .into_iter()
                .map(|(name, value)| (journal_field_name(name), value))
                .collect(),
        };
        match &self.sink {
            Sink::Journal(journal) => {
                let level = match entry.level {
                    Level::ERROR => log::Level::Error,
                    Level::WARN => log::Level::Warn,
                    Level::INFO => log::Level::Info,
                    Level::DEBUG => log::Level::Debug,
                    Level::TRACE => log::Level::Trace,
                };
                let kvs: Vec<(&str, &str)> = entry
                    .fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                // Nowhere to report a failed log write; journald being gone is also what
                // systemd would see first.
                let _ = journal.journal_send(
                    &log::Record::builder()
                        .level(level)
                        .target(meta.target())
                        .module_path(meta.module_path())
                        .file(meta.file())
                        .line(meta.line())
                        .key_values(&kvs)
                        .args(format_args!("{}", entry.message))
                        .build(),
                );
            }
            #[cfg(test)]
            Sink::Capture(entries) => {
                if let Ok(mut entries) = entries.lock() {
                    entries.push(entry);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (tempfile::TempDir, UnixDatagram, OsString) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        (dir, socket, path.into_os_string())
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    fn env(socket: &OsString) -> NotifyEnv {
        NotifyEnv {
            notify_socket: Some(socket.clone()),
            ..NotifyEnv::default()
        }
    }

    #[test]
    fn ready_reloading_stopping_reach_a_path_socket() {
        let (_dir, socket, path) = receiver();
        let n = Notifier::new(&env(&path), 42);
        assert!(n.is_enabled());
        n.ready("serving on 127.0.0.1:5000");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=serving on 127.0.0.1:5000\n");

        n.reloading("reloading");
        let msg = recv(&socket);
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .expect("MONOTONIC_USEC line")
            .parse()
            .expect("a number");
        assert!(usec > 0);
        assert_eq!(lines[2], "STATUS=reloading");

        n.stopping("draining\nconnections");
        assert_eq!(recv(&socket), "STOPPING=1\nSTATUS=draining connections\n");
        n.status("idle");
        assert_eq!(recv(&socket), "STATUS=idle\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_with_at_sign() {
        use std::os::linux::net::SocketAddrExt;
        let mut name = [0u8; 8];
        getrandom::fill(&mut name).expect("entropy");
        let name = format!("outpost-test-{}", hex::encode(name));
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let n = Notifier::new(&env(&OsString::from(format!("@{name}"))), 1);
        n.ready("ok");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=ok\n");
    }

    #[test]
    fn unset_or_unusable_socket_disables_notifications() {
        assert!(!Notifier::new(&NotifyEnv::default(), 1).is_enabled());
        assert!(!Notifier::new(&env(&OsString::new()), 1).is_enabled());
        assert!(!Notifier::new(&env(&OsString::from("relative/path")), 1).is_enabled());
        assert!(!Notifier::new(&env(&OsString::from("vsock:2:1234")), 1).is_enabled());
        // Disabled notifiers accept every call silently.
        let n = Notifier::disabled();
        n.ready("x");
        n.stopping("x");
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_and_only_for_our_pid() {
        let with = |usec: Option<&str>, pid: Option<&str>| NotifyEnv {
            notify_socket: Some("/run/x".into()),
            watchdog_usec: usec.map(Into::into),
            watchdog_pid: pid.map(Into::into),
        };
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval(&with(Some("30000000"), None), 7), half);
        assert_eq!(
            watchdog_interval(&with(Some("30000000"), Some("7")), 7),
            half
        );
        assert_eq!(
            watchdog_interval(&with(Some("30000000"), Some("8")), 7),
            None
        );
        assert_eq!(
            watchdog_interval(&with(Some("30000000"), Some("x")), 7),
            None
        );
        assert_eq!(watchdog_interval(&with(Some("0"), None), 7), None);
        assert_eq!(watchdog_interval(&with(Some("soon"), None), 7), None);
        assert_eq!(watchdog_interval(&with(None, Some("7")), 7), None);
    }

    #[tokio::test]
    async fn watchdog_pings_until_stopped() {
        let (_dir, socket, path) = receiver();
        let env = NotifyEnv {
            notify_socket: Some(path),
            watchdog_usec: Some("40000".into()),
            watchdog_pid: Some(std::process::id().to_string().into()),
        };
        let n = Notifier::new(&env, std::process::id());
        assert_eq!(n.watchdog_interval(), Some(Duration::from_millis(20)));
        let stop = CancellationToken::new();
        let task = n.spawn_watchdog(stop.clone()).expect("watchdog on");
        let socket = tokio::task::spawn_blocking(move || {
            for _ in 0..3 {
                assert_eq!(recv(&socket), "WATCHDOG=1\n");
            }
            socket
        })
        .await
        .expect("receiver");
        stop.cancel();
        task.await.expect("watchdog task");
        // Drain what was in flight, then nothing more arrives.
        socket.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 64];
        while socket.recv(&mut buf).is_ok() {}
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(socket.recv(&mut buf).is_err(), "ping after stop");
    }

    #[test]
    fn field_names_become_valid_journal_fields() {
        assert_eq!(journal_field_name("request_id"), "REQUEST_ID");
        assert_eq!(journal_field_name("status"), "STATUS");
        assert_eq!(journal_field_name("log.target"), "LOG_TARGET");
        assert_eq!(journal_field_name("_private"), "OUTPOST__PRIVATE");
        assert_eq!(journal_field_name("1st"), "OUTPOST_1ST");
        assert_eq!(journal_field_name("priority"), "OUTPOST_PRIORITY");
        assert_eq!(journal_field_name("target"), "OUTPOST_TARGET");
        assert_eq!(journal_field_name("größe"), "GR__E");
        assert_eq!(journal_field_name(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn message_line_quotes_only_where_needed() {
        let pairs = [
            ("status", "200".to_owned()),
            ("path", "/v2/".to_owned()),
            ("error", "no such file".to_owned()),
            ("empty", String::new()),
        ];
        assert_eq!(
            message_line(Some("request"), &pairs),
            r#"request status=200 path=/v2/ error="no such file" empty="""#
        );
        assert_eq!(message_line(None, &pairs[..1]), "status=200");
    }

    #[test]
    fn events_carry_their_own_and_their_spans_fields() {
        let entries = Arc::new(std::sync::Mutex::new(Vec::new()));
        let layer = JournalLayer {
            sink: Sink::Capture(entries.clone()),
        };
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = 7, repo = tracing::field::Empty);
            let _guard = span.enter();
            span.record("repo", "team/app");
            let e = io::Error::other("disk full");
            tracing::warn!(
                status = 500u16,
                error = &e as &dyn std::error::Error,
                "request failed"
            );
            tracing::info!(request_id = 8, "override");
        });
        let entries = entries.lock().expect("entries");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].level, Level::WARN);
        assert_eq!(
            entries[0].message,
            r#"request failed request_id=7 repo=team/app status=500 error="disk full""#
        );
        let field = |i: usize, name: &str| {
            entries[i]
                .fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(field(0, "REQUEST_ID").as_deref(), Some("7"));
        assert_eq!(field(0, "REPO").as_deref(), Some("team/app"));
        assert_eq!(field(0, "STATUS").as_deref(), Some("500"));
        assert_eq!(field(0, "ERROR").as_deref(), Some("disk full"));
        assert_eq!(field(1, "REQUEST_ID").as_deref(), Some("8"));
        assert_eq!(entries[1].fields.len(), 2, "no duplicate REQUEST_ID");
    }
}
