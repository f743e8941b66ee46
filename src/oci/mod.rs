//! Pure OCI distribution vocabulary: digests, repository names, references, manifests and
//! the spec's error codes.
//!
//! This module owns validation of everything a client can put in a URL or a manifest body.
//! It performs no I/O and depends on no other module of the crate: every other layer
//! receives these validated newtypes instead of strings.

mod digest;
mod error;
pub mod manifest;
mod name;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use error::ErrorCode;
pub use name::{NameError, Reference, RepoName, Tag};

/// Largest manifest body accepted or stored (distribution's limit).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
