//! Outpost: a pull-through caching edge mirror for container images.
//!
//! # Layout
//! - [`oci`]: pure protocol vocabulary (digests, names, references, manifests, error codes).
//! - [`auth`]: principals, signed API keys, tokens, access policy, revocation.
//!
//! # Dependency direction
//! `oci` depends on nothing. Domain modules (`auth`, `storage`, ...) never see hyper types
//! or HTTP status codes. Nothing depends on `http` or `app`.

pub mod auth;
pub mod oci;
