//! Outpost: a pull-through caching edge mirror for container images.
//!
//! # Layout
//! - [`oci`]: pure protocol vocabulary (digests, names, references, manifests, error codes).
//! - [`config`]: the TOML file and its validation into an immutable `Config`.
//! - [`storage`]: blob files, redb metadata, uploads, gc and fsck.
//! - [`auth`]: every access decision behind one service: principals, signed API keys,
//!   tokens, access policy, revocation; `auth::central` (cached central-registry logins:
//!   online checks, durable answers, grace) and `auth::keyring` (the durable side of API
//!   keys: revocations from the CLI and the revocation file, known keys and their last
//!   use, `key list`).
//! - [`mirror`]: scheduled mirroring: jobs, tag selection, platforms and schedules (the
//!   engine that runs them is not built yet).
//! - [`upstream`]: the registry of configured upstreams (lookup by name, alias or host;
//!   where a requested repository lives) and their clients (token flow, redirects,
//!   timeouts, circuit breaker).
//! - [`http`]: routing, the request pipeline, error mapping, listeners and TLS.
//! - [`admin`]: the local admin socket through which CLI commands reach a running daemon.
//! - [`app`]: the composition root and lifecycle; [`cli`]: commands behind the binary.
//! - [`clientconfig`]: containerd `hosts.toml` files and `registries.conf` entries that
//!   point nodes at Outpost, generated from the configured upstreams (pure text).
//! - [`systemd`]: sd_notify (ready, reload, stop, watchdog) and journald or stderr logs.
//!
//! # Dependency direction
//! `oci` depends on nothing. Domain modules (`auth`, `storage`, ...) never see hyper types
//! or HTTP status codes. `upstream` speaks HTTP to registries but hides it: its API has no
//! HTTP types or status codes, only classified errors. Nothing depends on `http` or `app`.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod clientconfig;
pub mod config;
pub mod http;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod pullthrough;
pub mod storage;
pub mod systemd;
pub mod upstream;
