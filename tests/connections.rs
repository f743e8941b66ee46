//! Connections that misbehave, through the in-process daemon on raw sockets: one that
//! never speaks is closed; one that stops reading a large blob is disconnected, while a
//! slow reader that keeps reading gets everything; beyond `server.max_connections` new
//! connections are closed at once with one log line, not a flood.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Starts a daemon whose `[server]` section gets `server`.
fn start(dir: &std::path::Path, issuer: &Issuer, server: &str) -> Server {
    Server::start_sections(
        dir,
        issuer,
        &Sections {
            server,
            ..Sections::default()
        },
    )
}

/// Reads until EOF or an error; how many bytes came, and whether it ended (within
/// `patience`, a generous bound: the test is about closing, not about when).
fn drain(stream: &mut TcpStream, patience: Duration) -> (usize, bool) {
    stream.set_read_timeout(Some(patience)).expect("timeout");
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (total, true),
            Ok(n) => total += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return (total, false);
            }
            Err(_) => return (total, true),
        }
    }
}

/// Regression: `header_timeout` started at the first byte, so connections that never
/// spoke were never closed (300 of them held for a whole test).
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_never_speaks_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = start(dir.path(), &issuer, "header_timeout = \"1s\"");
    let mut silent = TcpStream::connect(&server.addr).expect("connect");
    let (got, closed) =
        tokio::task::spawn_blocking(move || drain(&mut silent, Duration::from_secs(20)))
            .await
            .expect("drain");
    assert!(closed, "a silent connection was never closed");
    assert_eq!(got, 0);
}

/// Regression: a client that sent one GET for a large blob and never read held its
/// socket and the file forever. It is disconnected after `body_idle_timeout` without
/// progress; a slow reader that keeps reading gets every byte.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_disconnected_and_a_slow_one_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = start(dir.path(), &issuer, "body_idle_timeout = \"3s\"");
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let blob = bytes(3, 32 << 20);
    let (digest, status) = push_blob(&server, &key, "team/app", &blob).await;
    assert_eq!(status, 201);
    let request = format!(
        "GET /v2/team/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"
    );

    let mut stuck = TcpStream::connect(&server.addr).expect("connect");
    stuck.write_all(request.as_bytes()).expect("send");
    let mut first = vec![0u8; 4096];
    stuck.read_exact(&mut first).expect("the first bytes");
    std::thread::sleep(Duration::from_secs(8));
    let (got, closed) =
        tokio::task::spawn_blocking(move || drain(&mut stuck, Duration::from_secs(20)))
            .await
            .expect("drain");
    assert!(closed);
    assert!(
        got + 4096 < blob.len(),
        "the stalled client was cut off ({got} more bytes)"
    );

    let mut slow = TcpStream::connect(&server.addr).expect("connect");
    slow.write_all(request.as_bytes()).expect("send");
    let total = tokio::task::spawn_blocking(move || {
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 20];
        slow.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        while total < blob.len() {
            match slow.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            // Slow, but never silent for anywhere near the 3 s limit.
            std::thread::sleep(Duration::from_millis(100));
        }
        total
    })
    .await
    .expect("slow reader");
    assert!(total >= 32 << 20, "the slow reader got {total} bytes");
}

/// Regression: with the descriptor limit reached, every new client timed out and the log
/// got ~20 `accept failed` lines a second. Beyond `server.max_connections` a connection
/// is closed at once, and the log says so once, however many are refused.
#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_limit_are_closed_with_one_log_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = start(dir.path(), &issuer, "max_connections = 3");
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&server.addr).expect("connect"))
        .collect();
    // The server has admitted them once it answers on them.
    for s in &mut held {
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        let mut buf = [0u8; 9];
        s.read_exact(&mut buf).expect("answer");
        assert_eq!(&buf, b"HTTP/1.1 ");
    }
    for _ in 0..20 {
        let mut extra = TcpStream::connect(&server.addr).expect("connect");
        let (got, closed) = drain(&mut extra, Duration::from_secs(10));
        assert!(
            closed && got == 0,
            "a connection beyond the limit is closed at once"
        );
    }
    let logs = server.logs();
    assert_eq!(
        logs.matches("connection limit reached").count(),
        1,
        "{logs}"
    );
    // A held connection still works, and closing one makes room.
    held[0]
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut buf = [0u8; 9];
    held[0].read_exact(&mut buf).expect("answer");
    drop(held.pop());
    let mut room = None;
    for _ in 0..50 {
        let mut s = TcpStream::connect(&server.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        if s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").is_ok()
            && s.read_exact(&mut buf).is_ok()
        {
            room = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        room.is_some(),
        "a closed connection makes room for a new one"
    );
}
