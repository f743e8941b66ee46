//! Every redb table of the metadata database, its key and value encodings, and the schema
//! version. Nothing else in the crate names a table.
//!
//! Values are explicit little-endian byte layouts whose first byte is an encoding version,
//! so a later release can read what an earlier one wrote.

use redb::TableDefinition;

/// Bumped whenever a table's meaning or encoding changes incompatibly.
pub const SCHEMA_VERSION: u64 = 1;

/// `"schema_version"` → version.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// digest → [`BlobRecord`]: a verified blob file exists under this digest.
pub const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// (repository, digest) → [`LinkRecord`]: the repository may serve this blob.
pub const REPO_BLOBS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("repo_blobs");
/// digest → [`ManifestRecord`]: manifest bodies, stored verbatim.
pub const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// (repository, manifest digest) → link time: the repository holds this manifest.
pub const REPO_MANIFESTS: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("repo_manifests");
/// (repository, tag) → [`TagRecord`].
pub const TAGS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tags");
/// (repository, subject digest, referrer digest) → [`ReferrerRecord`] JSON.
pub const REFERRERS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("referrers");
/// repository → creation time: every repository that holds anything.
pub const REPOS: TableDefinition<&str, u64> = TableDefinition::new("repos");
/// upload id → [`UploadRecord`].
pub const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// (repository, tag, accept class) → [`TagRecord`] whose time is when the upstream last
/// confirmed the answer: the freshness of pull-through tags.
pub const UPSTREAM_TAGS: TableDefinition<(&str, &str, u8), &[u8]> =
    TableDefinition::new("upstream_tags");
/// digest → last time the blob was served (milliseconds), flushed in batches: the LRU order
/// of eviction.
pub const BLOB_ACCESS: TableDefinition<&str, u64> = TableDefinition::new("blob_access");
/// revoked API key id → time of revocation.
pub const REVOKED_KEYS: TableDefinition<&str, u64> = TableDefinition::new("revoked_keys");
/// central-registry user name → [`CentralUserRecord`]: the salted hash of the credential
/// last confirmed online, and when.
pub const CENTRAL_USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("central_users");
/// (central user name, repository at the central registry) → [`CentralDecisionRecord`].
/// The empty user name holds what the central registry serves anonymously.
pub const CENTRAL_DECISIONS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("central_decisions");
/// API key id → [`KeyRecord`]: keys this store has seen authenticate, or that were issued
/// for it. Claims only; no key is ever stored.
pub const KNOWN_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("known_keys");
/// mirror job name → `[v1][JSON of MirrorRunRecord]`: the job's last run, for
/// `outpost mirror status`.
pub const MIRROR_RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("mirror_runs");
/// (mirror job, repository, tag) → `[v1][JSON of MirroredTag]`: what the job last made the
/// tag point to, and every manifest and extra tag that came with it (the pins).
pub const MIRROR_TAGS: TableDefinition<(&str, &str, &str), &[u8]> =
    TableDefinition::new("mirror_tags");

const V1: u8 = 1;

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("corrupt {0} record")]
pub struct DecodeError(pub &'static str);

fn u64_at(b: &[u8], at: usize, what: &'static str) -> Result<u64, DecodeError> {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_le_bytes)
        .ok_or(DecodeError(what))
}

fn check_version(b: &[u8], what: &'static str) -> Result<(), DecodeError> {
    if b.first() == Some(&V1) {
        Ok(())
    } else {
        Err(DecodeError(what))
    }
}

/// A verified blob file: `[v1][size u64][created u64]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRecord {
    pub size: u64,
    pub created: u64,
}

impl BlobRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17);
        v.push(V1);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.created.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<BlobRecord, DecodeError> {
        check_version(b, "blob")?;
        Ok(BlobRecord {
            size: u64_at(b, 1, "blob")?,
            created: u64_at(b, 9, "blob")?,
        })
    }
}

/// Why a repository may serve a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkOrigin {
    /// Uploaded (or mounted) into this repository by a client.
    Upload = 1,
    /// Confirmed by the upstream for this repository.
    Upstream = 2,
    /// Mirrored by a scheduled job: pinned like hosted content, never evicted.
    Mirror = 3,
}

/// `[v1][origin u8][linked_at u64]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkRecord {
    pub origin: LinkOrigin,
    pub linked_at: u64,
}

impl LinkRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(10);
        v.push(V1);
        v.push(self.origin as u8);
        v.extend_from_slice(&self.linked_at.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<LinkRecord, DecodeError> {
        check_version(b, "link")?;
        let origin = match b.get(1) {
            Some(1) => LinkOrigin::Upload,
            Some(2) => LinkOrigin::Upstream,
            Some(3) => LinkOrigin::Mirror,
            _ => return Err(DecodeError("link")),
        };
        Ok(LinkRecord {
            origin,
            linked_at: u64_at(b, 2, "link")?,
        })
    }
}

/// `[v1][media type length u16][media type][body]`.
pub struct ManifestRecord<'a> {
    pub media_type: &'a str,
    pub body: &'a [u8],
}

impl<'a> ManifestRecord<'a> {
    pub fn encode(media_type: &str, body: &[u8]) -> Vec<u8> {
        let mt = media_type.as_bytes();
        // Media types are short; the header caps them so the length always fits.
        let len = u16::try_from(mt.len()).unwrap_or(u16::MAX);
        let mut v = Vec::with_capacity(3 + mt.len() + body.len());
        v.push(V1);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&mt[..usize::from(len)]);
        v.extend_from_slice(body);
        v
    }

    pub fn decode(b: &'a [u8]) -> Result<ManifestRecord<'a>, DecodeError> {
        check_version(b, "manifest")?;
        let len = b
            .get(1..3)
            .map(|s| usize::from(u16::from_le_bytes([s[0], s[1]])))
            .ok_or(DecodeError("manifest"))?;
        let media_type = b
            .get(3..3 + len)
            .and_then(|s| std::str::from_utf8(s).ok())
            .ok_or(DecodeError("manifest"))?;
        Ok(ManifestRecord {
            media_type,
            body: &b[3 + len..],
        })
    }
}

/// `[v1][updated u64][digest]`. The update time is kept for freshness decisions; readers
/// that need only the digest skip it.
pub struct TagRecord<'a> {
    pub updated: u64,
    pub digest: &'a str,
}

impl<'a> TagRecord<'a> {
    pub fn encode(updated: u64, digest: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(9 + digest.len());
        v.push(V1);
        v.extend_from_slice(&updated.to_le_bytes());
        v.extend_from_slice(digest.as_bytes());
        v
    }

    pub fn decode(b: &'a [u8]) -> Result<TagRecord<'a>, DecodeError> {
        check_version(b, "tag")?;
        Ok(TagRecord {
            updated: u64_at(b, 1, "tag")?,
            digest: std::str::from_utf8(&b[9..]).map_err(|_| DecodeError("tag"))?,
        })
    }
}

/// An upload session: `[v1][started u64][repository]`. Its bytes live in a file named
/// after the id; the offset is that file's length.
pub struct UploadRecord<'a> {
    pub started: u64,
    /// Who opened the session (see `Principal::session_owner`); empty in sessions a
    /// release before owners were recorded opened: those stay open to anyone allowed to
    /// push to the repository.
    pub owner: &'a str,
    pub repo: &'a str,
}

/// Encoding version of an upload record with its owner.
const UPLOAD_V2: u8 = 2;

impl<'a> UploadRecord<'a> {
    /// `[v2][started u64][owner length u16][owner][repository]`.
    pub fn encode(started: u64, owner: &str, repo: &str) -> Vec<u8> {
        let owner = &owner.as_bytes()[..owner.len().min(u16::MAX as usize)];
        let mut v = Vec::with_capacity(11 + owner.len() + repo.len());
        v.push(UPLOAD_V2);
        v.extend_from_slice(&started.to_le_bytes());
        v.extend_from_slice(&(owner.len() as u16).to_le_bytes());
        v.extend_from_slice(owner);
        v.extend_from_slice(repo.as_bytes());
        v
    }

    /// Reads both `[v1][started u64][repository]` and the v2 layout.
    pub fn decode(b: &'a [u8]) -> Result<UploadRecord<'a>, DecodeError> {
        let text = |s: &'a [u8]| std::str::from_utf8(s).map_err(|_| DecodeError("upload"));
        match b.first() {
            Some(&V1) => Ok(UploadRecord {
                started: u64_at(b, 1, "upload")?,
                owner: "",
                repo: text(b.get(9..).ok_or(DecodeError("upload"))?)?,
            }),
            Some(&UPLOAD_V2) => {
                let len = b
                    .get(9..11)
                    .map(|l| u16::from_le_bytes([l[0], l[1]]) as usize)
                    .ok_or(DecodeError("upload"))?;
                let owner = b.get(11..11 + len).ok_or(DecodeError("upload"))?;
                Ok(UploadRecord {
                    started: u64_at(b, 1, "upload")?,
                    owner: text(owner)?,
                    repo: text(b.get(11 + len..).ok_or(DecodeError("upload"))?)?,
                })
            }
            _ => Err(DecodeError("upload")),
        }
    }
}

/// The descriptor the referrers API returns, as stored: `[v1][JSON]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferrerRecord {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

impl ReferrerRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![V1];
        // Serializing a struct of strings and maps cannot fail.
        v.extend(serde_json::to_vec(self).unwrap_or_default());
        v
    }

    pub fn decode(b: &[u8]) -> Result<ReferrerRecord, DecodeError> {
        check_version(b, "referrer")?;
        serde_json::from_slice(&b[1..]).map_err(|_| DecodeError("referrer"))
    }
}

/// A central user's credential: `[v1][salt 16][hash 32][verified_at u64]`. The hash is an
/// HMAC-SHA256 keyed by the salt (`auth::central::rules::credential_hash`); never the password.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CentralUserRecord {
    pub salt: [u8; 16],
    pub hash: [u8; 32],
    /// Unix seconds of the last online confirmation.
    pub verified_at: u64,
}

impl std::fmt::Debug for CentralUserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CentralUserRecord")
            .field("verified_at", &self.verified_at)
            .finish_non_exhaustive()
    }
}

impl CentralUserRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(57);
        v.push(V1);
        v.extend_from_slice(&self.salt);
        v.extend_from_slice(&self.hash);
        v.extend_from_slice(&self.verified_at.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<CentralUserRecord, DecodeError> {
        const WHAT: &str = "central user";
        check_version(b, WHAT)?;
        let salt = b.get(1..17).and_then(|s| s.try_into().ok());
        let hash = b.get(17..49).and_then(|s| s.try_into().ok());
        match (salt, hash) {
            (Some(salt), Some(hash)) => Ok(CentralUserRecord {
                salt,
                hash,
                verified_at: u64_at(b, 49, WHAT)?,
            }),
            _ => Err(DecodeError(WHAT)),
        }
    }
}

/// The central registry's answer on one user pulling one repository:
/// `[v1][allowed u8][confirmed_at u64]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CentralDecisionRecord {
    pub allowed: bool,
    /// Unix seconds of the central registry's last answer.
    pub confirmed_at: u64,
}

impl CentralDecisionRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(10);
        v.push(V1);
        v.push(u8::from(self.allowed));
        v.extend_from_slice(&self.confirmed_at.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<CentralDecisionRecord, DecodeError> {
        const WHAT: &str = "central decision";
        check_version(b, WHAT)?;
        let allowed = match b.get(1) {
            Some(0) => false,
            Some(1) => true,
            _ => return Err(DecodeError(WHAT)),
        };
        Ok(CentralDecisionRecord {
            allowed,
            confirmed_at: u64_at(b, 2, WHAT)?,
        })
    }
}

/// What is known of an API key, by id: its claims as signed, when this store learned of it
/// and when it last authenticated. `[v1][JSON]`, so fields can be added.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    pub subject: String,
    /// The issuer id (a public key fingerprint) that signed the key.
    pub issuer: String,
    pub repos: Vec<String>,
    /// Comma-separated, as in the key (`pull,push`).
    pub actions: String,
    /// Seconds since the Unix epoch, as are the other times.
    pub issued_at: u64,
    pub expires_at: u64,
    pub recorded_at: u64,
    #[serde(default)]
    pub last_used: Option<u64>,
}

impl KeyRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![V1];
        // Serializing a struct of strings and numbers cannot fail.
        v.extend(serde_json::to_vec(self).unwrap_or_default());
        v
    }

    pub fn decode(b: &[u8]) -> Result<KeyRecord, DecodeError> {
        check_version(b, "key")?;
        serde_json::from_slice(&b[1..]).map_err(|_| DecodeError("key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn central_records_round_trip_and_refuse_truncation() {
        let u = CentralUserRecord {
            salt: [1; 16],
            hash: [2; 32],
            verified_at: 99,
        };
        assert_eq!(CentralUserRecord::decode(&u.encode()).ok(), Some(u));
        assert!(CentralUserRecord::decode(&u.encode()[..50]).is_err());
        assert!(!format!("{u:?}").contains("2, 2"), "hash not shown");
        let d = CentralDecisionRecord {
            allowed: true,
            confirmed_at: 7,
        };
        assert_eq!(CentralDecisionRecord::decode(&d.encode()).ok(), Some(d));
        assert!(CentralDecisionRecord::decode(&[1, 2, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(CentralDecisionRecord::decode(&[1, 1, 0]).is_err());
    }

    #[test]
    fn records_round_trip() {
        let b = BlobRecord {
            size: 7,
            created: 9,
        };
        assert_eq!(BlobRecord::decode(&b.encode()).ok(), Some(b));
        let l = LinkRecord {
            origin: LinkOrigin::Upstream,
            linked_at: 3,
        };
        assert_eq!(LinkRecord::decode(&l.encode()).ok(), Some(l));
        let m = ManifestRecord::encode("application/x", b"{}");
        let d = ManifestRecord::decode(&m).expect("valid");
        assert_eq!((d.media_type, d.body), ("application/x", &b"{}"[..]));
        let t = TagRecord::encode(5, "sha256:00");
        assert_eq!(
            TagRecord::decode(&t).map(|t| t.digest).ok(),
            Some("sha256:00")
        );
        let k = KeyRecord {
            subject: "ci".into(),
            issuer: "0123456789abcdef".into(),
            repos: vec!["team/**".into()],
            actions: "pull,push".into(),
            issued_at: 1,
            expires_at: 2,
            recorded_at: 3,
            last_used: Some(4),
        };
        assert_eq!(KeyRecord::decode(&k.encode()).ok(), Some(k));
        let u = UploadRecord::encode(8, "key:ab12", "a/b");
        assert_eq!(
            UploadRecord::decode(&u)
                .map(|u| (u.started, u.owner, u.repo))
                .ok(),
            Some((8, "key:ab12", "a/b"))
        );
        // A session recorded before owners were: nobody's in particular.
        let mut v1 = vec![1];
        v1.extend_from_slice(&8u64.to_le_bytes());
        v1.extend_from_slice(b"a/b");
        assert_eq!(
            UploadRecord::decode(&v1)
                .map(|u| (u.started, u.owner, u.repo))
                .ok(),
            Some((8, "", "a/b"))
        );
    }

    #[test]
    fn refuses_unknown_versions_and_truncation() {
        assert!(BlobRecord::decode(&[2, 0, 0]).is_err());
        assert!(BlobRecord::decode(&[1, 0, 0]).is_err());
        assert!(ManifestRecord::decode(&[1, 200, 0, b'x']).is_err());
        assert!(TagRecord::decode(&[]).is_err());
        assert!(KeyRecord::decode(&[2, b'{', b'}']).is_err());
        assert!(KeyRecord::decode(&[1, b'{']).is_err());
    }
}
