//! Outpost: a pull-through caching edge mirror for container images.
//!
//! # Layout
//! The public surface is what the `outpost` binary and the integration tests use:
//! [`app`] (the daemon), [`cli`], [`config`], [`oci`], [`systemd`] and a few re-exports.
//! Everything else is crate-private, so rustc reports what nothing uses.
//!
//! - [`oci`]: pure protocol vocabulary (digests, names, references, manifests, error codes).
//! - [`config`]: the TOML file and its validation into an immutable `Config`.
//! - `storage`: the one blob writer (temp file, hash, verify, fsync, rename), blob files,
//!   redb metadata (every table in `storage::schema`), uploads, eviction, gc and fsck.
//! - `upstream`: the registry of configured upstreams (lookup by name, alias or host;
//!   where a requested repository lives, `upstream::namespace`) and their clients (token
//!   flow, redirects, timeouts, circuit breaker, typed tags and referrers).
//! - `pullthrough`: answering upstream repositories from the store or the upstream:
//!   freshness and stale fallback for every kind of document, coalescing (`singleflight`,
//!   downloads in flight by digest in `flight`), its metrics and central learning.
//! - `hosted`: the write rules of repositories pushed here (digests, immutable tags,
//!   mounts); reads and uploads go straight to `storage`.
//! - `auth`: every access decision behind one service (`auth::Access`): principals,
//!   signed API keys, tokens, access policy, revocation, the failed-login throttle;
//!   `auth::central` (cached central-registry logins) and `auth::keyring` (the durable
//!   side of API keys: revocation file, known keys and their last use, `key list`).
//! - `mirror`: mirroring chosen repositories of an upstream: validated jobs, tag
//!   selection, platforms, schedules, and the engine (`mirror::Mirror`) that runs jobs on
//!   the shared upstream registry and the store's one blob writer, pinning what it stores.
//! - `http`: routing, the request pipeline (one span per request), the one error mapping,
//!   listeners and TLS. It parses, calls one service, and maps the answer.
//! - `metrics`: the Prometheus registry every module counts into; `clock`: the time
//!   TTLs and schedules are judged at (tests move it with tokio's paused time).
//! - `admin`: the local admin socket through which CLI commands reach a running daemon.
//! - `clientconfig`: containerd `hosts.toml` files and `registries.conf` entries that
//!   point nodes at Outpost, generated from the configured upstreams (pure text).
//! - [`app`]: the composition root and lifecycle; [`cli`]: commands behind the binary.
//! - [`systemd`]: sd_notify (ready, reload, stop, watchdog) and journald or stderr logs.
//! - `fuzzing` (only under `--cfg fuzzing` and in tests): entry points for `fuzz/`.
//!
//! # Dependency direction
//! `oci` depends on nothing. Domain modules (`auth`, `storage`, `pullthrough`, `mirror`,
//! ...) never see hyper types or HTTP status codes. `upstream` speaks HTTP to registries but hides it: its API has no
//! HTTP types or status codes, only classified errors. Nothing depends on `http` or `app`.

pub(crate) mod admin;
pub mod app;
pub(crate) mod auth;
pub mod cli;
pub(crate) mod clientconfig;
pub(crate) mod clock;
pub mod config;
#[cfg(any(fuzzing, test))]
pub mod fuzzing;
pub(crate) mod hosted;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod mirror;
pub mod oci;
pub(crate) mod pullthrough;
pub(crate) mod storage;
pub mod systemd;
pub(crate) mod upstream;

pub use auth::decode_unverified;
pub use http::Listeners;
pub use upstream::install_crypto_provider;
