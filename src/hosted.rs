//! The hosted registry: repositories pushed to this Outpost. Owns the rules of writes to
//! them: a manifest pushed by digest must have that digest and must parse; tags under an
//! immutable-tag rule may be written once (the same digest again is fine) and never
//! deleted, nor may the manifest they point to; a cross-repository mount needs read
//! access to the source and falls back to an upload without it.
//!
//! Reads, uploads and lists go straight to `storage`; only decisions live here. Knows
//! nothing of HTTP: the caller hands in bytes and maps [`HostedError`].

use bytes::Bytes;

use crate::auth::{Access, Action, Principal};
use crate::oci::manifest::{Manifest, ManifestError};
use crate::oci::{Digest, Reference, RepoName};
use crate::storage::{ManifestDeletion, PutManifest, PutManifestError, StorageError, Store};

/// Why a write to a hosted repository was refused.
#[derive(Debug, thiserror::Error)]
pub enum HostedError {
    /// The manifest's bytes do not have the digest the client named.
    #[error("manifest digest is {actual}, not the {expected} in the URL")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(transparent)]
    Invalid(#[from] ManifestError),
    /// Refused by the store: a missing blob or child manifest, an immutable tag.
    #[error(transparent)]
    Put(#[from] PutManifestError),
    /// An immutable-tag rule forbids this delete; the message names tag and rule.
    #[error("{0}")]
    Protected(String),
    /// Nothing to delete.
    #[error("manifest unknown")]
    Unknown,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A manifest as stored by a push.
#[derive(Debug)]
pub struct Pushed {
    pub digest: Digest,
    /// The manifest's `subject`, for the `OCI-Subject` answer.
    pub subject: Option<Digest>,
}

/// The hosted registry's write rules over the store. Cheap to clone.
#[derive(Clone)]
pub struct Hosted {
    store: Store,
    access: Access,
}

impl Hosted {
    pub fn new(store: Store, access: Access) -> Hosted {
        Hosted { store, access }
    }

    /// Stores a pushed manifest under `reference` (a tag, or the digest it must have).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        body: Bytes,
        content_type: Option<&str>,
    ) -> Result<Pushed, HostedError> {
        let (digest, tag) = match reference {
            Reference::Digest(expected) => {
                let actual = Digest::of(expected.algorithm(), &body);
                if &actual != expected {
                    return Err(HostedError::DigestMismatch {
                        expected: expected.clone(),
                        actual,
                    });
                }
                (actual, None)
            }
            Reference::Tag(t) => (Digest::sha256_of(&body), Some(t.clone())),
        };
        let manifest = Manifest::parse(&body, content_type)?;
        let immutable_rule = tag
            .as_ref()
            .and_then(|t| self.access.immutable_rule(repo, t));
        let subject = manifest.subject.as_ref().map(|s| s.digest.clone());
        self.store
            .put_manifest(PutManifest {
                repo: repo.clone(),
                tag,
                digest: digest.clone(),
                body,
                manifest,
                immutable_rule,
            })
            .await?;
        Ok(Pushed { digest, subject })
    }

    /// Deletes a tag, or a manifest with the tags pointing at it, unless an immutable-tag
    /// rule protects one of them. A tag under a rule is refused whether or not it exists
    /// yet: checking first would let a push slip in between the check and the delete.
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(), HostedError> {
        let deleted = match reference {
            Reference::Digest(d) => {
                let (access, r) = (self.access.clone(), repo.clone());
                let protected = move |tag: &str| {
                    let tag = tag.parse().ok()?;
                    access.immutable_rule(&r, &tag)
                };
                match self.store.delete_manifest(repo, d, protected).await? {
                    ManifestDeletion::Deleted => true,
                    ManifestDeletion::Unknown => false,
                    ManifestDeletion::Protected { tag, rule } => {
                        return Err(HostedError::Protected(format!(
                            "tag {tag} points to this manifest and is immutable under {rule}; \
                             the manifest cannot be deleted"
                        )));
                    }
                }
            }
            Reference::Tag(t) => {
                if let Some(rule) = self.access.immutable_rule(repo, t) {
                    return Err(HostedError::Protected(format!(
                        "tag is immutable under {rule} and cannot be deleted"
                    )));
                }
                self.store.delete_tag(repo, t).await?
            }
        };
        if deleted {
            Ok(())
        } else {
            Err(HostedError::Unknown)
        }
    }

    /// Links `digest` from `from` into `to` if `principal` may read `from` and `from`
    /// holds it. `false`: the client uploads instead.
    pub async fn mount(
        &self,
        principal: &Principal,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
    ) -> Result<bool, StorageError> {
        if !self.access.permits(principal, from, Action::Pull) {
            return Ok(false);
        }
        self.store.mount_blob(from, to, digest).await
    }
}
