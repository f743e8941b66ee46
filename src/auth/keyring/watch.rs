//! Noticing that a file changed, by polling its metadata: device and inode (an editor or
//! `mv` replacing the file), size (an append), and modification and status-change times
//! (a rewrite in place). No notification API and no dependency: one `stat` every few
//! seconds costs nothing and works on every filesystem, network mounts included.
//!
//! Pure apart from [`FileStamp::read`]; the caller decides what a change means.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What identifies one version of a file, as far as polling can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The stamp of the file at `path` (following symlinks), or `None` if there is none.
    pub fn read(path: &Path) -> io::Result<Option<FileStamp>> {
        match std::fs::metadata(path) {
            Ok(meta) => Ok(Some(FileStamp::of(&meta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What happened to a file since it was last observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Unchanged,
    /// Created, replaced, or written to.
    Modified,
    Removed,
}

/// Remembers the last stamp observed and classifies the next one.
#[derive(Clone, Debug)]
pub struct ChangeDetector {
    last: Option<FileStamp>,
}

impl ChangeDetector {
    /// `initial` is the stamp of the version already read, taken before reading it, so a
    /// write racing with that read shows up as a change at the first observation.
    pub fn new(initial: Option<FileStamp>) -> ChangeDetector {
        ChangeDetector { last: initial }
    }

    /// Classifies `current` against the last stamp and remembers it.
    pub fn observe(&mut self, current: Option<FileStamp>) -> Change {
        if current == self.last {
            return Change::Unchanged;
        }
        self.last = current;
        match current {
            Some(_) => Change::Modified,
            None => Change::Removed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn stamp(ino: u64, len: u64, mtime: i64) -> FileStamp {
        FileStamp {
            dev: 1,
            ino,
            len,
            mtime: (mtime, 0),
            ctime: (mtime, 0),
        }
    }

    #[test]
    fn classifies_each_kind_of_change() {
        let mut d = ChangeDetector::new(Some(stamp(7, 10, 100)));
        assert_eq!(d.observe(Some(stamp(7, 10, 100))), Change::Unchanged);
        assert_eq!(
            d.observe(Some(stamp(7, 20, 100))),
            Change::Modified,
            "append"
        );
        assert_eq!(
            d.observe(Some(stamp(7, 20, 101))),
            Change::Modified,
            "rewrite"
        );
        assert_eq!(
            d.observe(Some(stamp(8, 20, 101))),
            Change::Modified,
            "replaced"
        );
        assert_eq!(d.observe(Some(stamp(8, 20, 101))), Change::Unchanged);
        assert_eq!(d.observe(None), Change::Removed);
        assert_eq!(d.observe(None), Change::Unchanged);
        assert_eq!(
            d.observe(Some(stamp(9, 0, 102))),
            Change::Modified,
            "created"
        );
        let mut missing = ChangeDetector::new(None);
        assert_eq!(missing.observe(None), Change::Unchanged);
        assert_eq!(missing.observe(Some(stamp(1, 0, 1))), Change::Modified);
    }

    #[test]
    fn sees_real_appends_and_replacements() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("revoked");
        std::fs::write(&path, "# none yet\n").expect("write");
        let mut d = ChangeDetector::new(FileStamp::read(&path).expect("stat"));
        assert_eq!(
            d.observe(FileStamp::read(&path).expect("stat")),
            Change::Unchanged
        );

        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(b"0123456789abcdef0123456789abcdef\n")
            .expect("append");
        drop(f);
        assert_eq!(
            d.observe(FileStamp::read(&path).expect("stat")),
            Change::Modified
        );

        // Same size, new inode: the way editors and `mv` replace a file.
        let next = dir.path().join("revoked.new");
        std::fs::write(&next, "fedcba9876543210fedcba9876543210\n# replaced\n").expect("write");
        let same_len = std::fs::metadata(&path).expect("stat").len();
        assert_eq!(std::fs::metadata(&next).expect("stat").len(), same_len);
        std::fs::rename(&next, &path).expect("rename");
        assert_eq!(
            d.observe(FileStamp::read(&path).expect("stat")),
            Change::Modified
        );

        std::fs::remove_file(&path).expect("remove");
        assert_eq!(
            d.observe(FileStamp::read(&path).expect("stat")),
            Change::Removed
        );
    }
}
