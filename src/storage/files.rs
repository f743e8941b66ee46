//! Blob files on disk: the content-addressed layout, temp, upload and partial files, and
//! the crash-safe commit (write → fsync → rename → fsync directory).
//!
//! Partial files (`partial/<algorithm>-<hex>`) are mirrored downloads that were cut off:
//! unlike temp files they survive a restart, so the next run resumes them with `Range`;
//! gc removes those untouched for its grace period.
//!
//! Invariant: a file under `blobs/` is always complete and verified, because nothing is
//! ever written there except by an atomic rename of an fsynced, digest-checked file.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::oci::{Algorithm, Digest, Hasher};

/// A byte range of an open blob file (stored, or still being downloaded), for sending.
#[derive(Clone, Debug)]
pub struct FileRange {
    pub file: std::sync::Arc<File>,
    pub offset: u64,
    pub len: u64,
}

/// Blob files found on disk as (digest, path), and files whose names are not digests.
pub type BlobListing = (Vec<(Digest, PathBuf)>, Vec<PathBuf>);

/// Paths under the storage root.
#[derive(Debug)]
pub struct BlobFiles {
    blobs: PathBuf,
    tmp: PathBuf,
    uploads: PathBuf,
    partial: PathBuf,
}

impl BlobFiles {
    /// Creates the directory layout and sweeps temp files a crash left behind.
    pub fn open(root: &Path) -> io::Result<BlobFiles> {
        let files = BlobFiles {
            blobs: root.join("blobs"),
            tmp: root.join("tmp"),
            uploads: root.join("uploads"),
            partial: root.join("partial"),
        };
        for dir in [&files.blobs, &files.tmp, &files.uploads, &files.partial] {
            fs::create_dir_all(dir)?;
        }
        for entry in fs::read_dir(&files.tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(files)
    }

    /// `blobs/<algorithm>/<first two hex>/<hex>`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    pub fn upload_path(&self, id: &str) -> PathBuf {
        self.uploads.join(id)
    }

    pub fn uploads_dir(&self) -> &Path {
        &self.uploads
    }

    /// Bytes free for unprivileged writers on the blobs' filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        free_bytes(&self.blobs)
    }

    /// Where a resumable download of `digest` keeps its bytes until verified.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.partial
            .join(format!("{}-{}", digest.algorithm().as_str(), digest.hex()))
    }

    pub fn partial_dir(&self) -> &Path {
        &self.partial
    }

    /// A fresh, unique temp file path on the same filesystem as the blobs.
    pub fn temp_path(&self) -> PathBuf {
        self.tmp.join(random_id())
    }

    /// Moves the fully written, verified file at `from` into its content-addressed place.
    /// If the blob already exists the new copy is dropped: content addressing makes them
    /// equal, and the existing file is never touched.
    pub fn commit(&self, from: &Path, digest: &Digest) -> io::Result<()> {
        File::open(from)?.sync_all()?;
        let dest = self.blob_path(digest);
        if dest.exists() {
            fs::remove_file(from)?;
            return Ok(());
        }
        let dir = dest
            .parent()
            .ok_or_else(|| io::Error::other("blob path has no parent"))?;
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            if let Some(up) = dir.parent() {
                sync_dir(up)?;
            }
        }
        fs::rename(from, &dest)?;
        sync_dir(dir)
    }

    pub fn remove_blob(&self, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.blob_path(digest)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Every blob file on disk, as (digest, path). Files with names that are not digests
    /// are skipped (and reported by fsck through the second list).
    pub fn list_blobs(&self) -> io::Result<BlobListing> {
        let mut found = Vec::new();
        let mut strays = Vec::new();
        if !self.blobs.exists() {
            return Ok((found, strays));
        }
        for algo in fs::read_dir(&self.blobs)? {
            let algo = algo?;
            for prefix in fs::read_dir(algo.path())? {
                let prefix = prefix?;
                for file in fs::read_dir(prefix.path())? {
                    let file = file?;
                    let name = format!(
                        "{}:{}",
                        algo.file_name().to_string_lossy(),
                        file.file_name().to_string_lossy()
                    );
                    match name.parse::<Digest>() {
                        Ok(d) if self.blob_path(&d) == file.path() => found.push((d, file.path())),
                        _ => strays.push(file.path()),
                    }
                }
            }
        }
        Ok((found, strays))
    }
}

/// Hashes a whole file, returning its digest under `algorithm` and its length.
pub fn hash_file(path: &Path, algorithm: Algorithm) -> io::Result<(Digest, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Hasher::new(algorithm);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher.finish(), size));
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
}

/// fsync a directory so a rename or create inside it survives power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// 128 random bits as hex: upload ids and temp names. Unguessable, so an upload id is
/// also a capability that cannot be enumerated.
pub fn random_id() -> String {
    let mut buf = [0u8; 16];
    // getrandom only fails when the OS has no entropy source at all; fall back to time
    // and address entropy rather than panic (ids stay unique, if not unguessable).
    if getrandom::fill(&mut buf).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        buf = t.to_le_bytes();
    }
    hex::encode(buf)
}

/// Bytes free for unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
