//! Entry points for `cargo fuzz` (fuzz/): each takes arbitrary bytes, feeds one parser of
//! untrusted input and must never panic, hang or allocate without bound, whatever the
//! bytes. Built only for fuzzing (`--cfg fuzzing`) and for this module's own tests, which
//! run every entry on its seed inputs so the entries cannot rot between fuzzing runs.
//!
//! Must not: hold state between calls, or touch the disk or the network.

use std::time::{Duration, SystemTime};

use crate::auth::TokenSigner;
use crate::config::Config;
use crate::oci::manifest::Manifest;
use crate::oci::{Digest, Reference, RepoName, Tag};

/// The text of `data`, if it is UTF-8 (every header and path parser takes text).
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// The router: a method, a path and a query, separated by the first two newlines.
pub fn router(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let mut parts = s.splitn(3, '\n');
    let method = parts.next().unwrap_or("GET");
    let path = parts.next().unwrap_or("/v2/");
    let query = parts.next();
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let _ = crate::http::route::route(&method, path, query);
}

/// Repository names, tags, digests and references.
pub fn names(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let _ = s.parse::<RepoName>();
    let _ = s.parse::<Tag>();
    let _ = s.parse::<Reference>();
    if let Ok(d) = s.parse::<Digest>() {
        // A digest that parses prints back the same way.
        assert_eq!(d.to_string(), s);
    }
}

/// Manifest and index bodies, under every media type a client may declare.
pub fn manifest(data: &[u8]) {
    for media_type in [
        None,
        Some("application/vnd.oci.image.manifest.v1+json"),
        Some("application/vnd.oci.image.index.v1+json"),
        Some("application/vnd.docker.distribution.manifest.v2+json"),
        Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    ] {
        if let Ok(m) = Manifest::parse(data, media_type) {
            let _ = m.required_blobs().count();
        }
    }
}

/// `Range` headers of blob GETs, against a size taken from the first 8 bytes.
pub fn range(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let Some(s) = text(&data[8..]) else { return };
    if let Ok(Some((start, end))) = crate::http::parse_range(s, size) {
        assert!(start <= end && end < size, "{s:?} of {size}: {start}-{end}");
    }
}

/// `WWW-Authenticate` challenges from upstreams.
pub fn www_authenticate(data: &[u8]) {
    if let Some(s) = text(data) {
        let _ = crate::upstream::challenge::parse(s);
    }
}

/// API keys (decoded without verification, as `key inspect` does) and `/token` tokens
/// (verified with a fixed secret: a forgery must never verify).
pub fn credentials(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let _ = crate::auth::decode_unverified(s);
    let signer = TokenSigner::new([7; 32]);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert!(
        signer.verify(s, now).is_err(),
        "arbitrary input verified as a token"
    );
}

/// Configuration files.
pub fn config(data: &[u8]) {
    if let Some(s) = text(data) {
        let _ = Config::from_toml(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry point runs on seeds of the kinds of input it fuzzes, without a panic.
    #[test]
    fn every_fuzz_entry_survives_its_seeds() {
        let mut range_seed = 1000u64.to_le_bytes().to_vec();
        range_seed.extend_from_slice(b"bytes=10-");
        type Entry = fn(&[u8]);
        let seeds: &[(Entry, &[&[u8]])] = &[
            (router, &[b"GET\n/v2/library/alpine/manifests/3.20\nns=docker.io", b"PATCH\n/v2/a/blobs/uploads/x\n", b"\n\n\n", b"GET\n/v2/../\n"]),
            (names, &[b"library/alpine", b"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", b"v1.2.3", b"A/B"]),
            (manifest, &[br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#, b"{", b"[]"]),
            (range, &[&range_seed, b"short"]),
            (www_authenticate, &[br#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#, b"Basic", b"Bearer ,,,=\""]),
            (credentials, &[b"opk1.e30.AAAA", b"opt1.x.y", b""]),
            (config, &[b"[server]\nlisten = [\"127.0.0.1:0\"]\n", b"[[mirror]]\nname = 1\n"]),
        ];
        for (entry, inputs) in seeds {
            for input in *inputs {
                entry(input);
            }
        }
    }
}
