//! The hot tags: an in-memory LRU of tag answers with the time the upstream last
//! confirmed each, so a fresh tag is served without touching the store. redb stays the
//! record (it survives restarts); this is only a faster copy of recent rows.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

use super::TagKey;
use crate::storage::StoredManifest;

/// Tags kept in memory. A manifest is a few KiB, so this bounds the memory to a few MiB.
const CAPACITY: NonZeroUsize = NonZeroUsize::new(1024).expect("non-zero");

pub struct FreshTags {
    entries: Mutex<LruCache<TagKey, (StoredManifest, u64)>>,
}

impl Default for FreshTags {
    fn default() -> FreshTags {
        FreshTags {
            entries: Mutex::new(LruCache::new(CAPACITY)),
        }
    }
}

impl FreshTags {
    /// The manifest for `key` if it was confirmed less than `ttl_secs` before `now`.
    pub fn get(&self, key: &TagKey, ttl_secs: u64, now: u64) -> Option<StoredManifest> {
        let mut entries = self.entries.lock().ok()?;
        match entries.get(key) {
            Some((m, at)) if now < at.saturating_add(ttl_secs) => Some(m.clone()),
            _ => None,
        }
    }

    /// Records that the upstream confirmed `manifest` for `key` at `validated_at`.
    pub fn put(&self, key: TagKey, manifest: StoredManifest, validated_at: u64) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.put(key, (manifest, validated_at));
        }
    }

    pub fn forget(&self, key: &TagKey) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.pop(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;
    use crate::storage::AcceptClass;
    use bytes::Bytes;

    fn manifest(body: &'static [u8]) -> StoredManifest {
        StoredManifest {
            digest: Digest::sha256_of(body),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            body: Bytes::from_static(body),
        }
    }

    fn key(tag: &str) -> TagKey {
        ("docker.io/library/a".into(), tag.into(), AcceptClass::Any)
    }

    #[test]
    fn entries_expire_with_the_ttl_and_can_be_forgotten() {
        let fresh = FreshTags::default();
        fresh.put(key("1"), manifest(b"{}"), 100);
        assert!(fresh.get(&key("1"), 60, 159).is_some());
        assert!(fresh.get(&key("1"), 60, 160).is_none());
        assert!(fresh.get(&key("2"), 60, 120).is_none());
        fresh.forget(&key("1"));
        assert!(fresh.get(&key("1"), 60, 120).is_none());
    }

    #[test]
    fn capacity_is_bounded() {
        let fresh = FreshTags::default();
        for i in 0..CAPACITY.get() + 10 {
            fresh.put(key(&i.to_string()), manifest(b"{}"), 100);
        }
        assert!(fresh.get(&key("0"), 60, 120).is_none());
        let last = (CAPACITY.get() + 9).to_string();
        assert!(fresh.get(&key(&last), 60, 120).is_some());
    }
}
