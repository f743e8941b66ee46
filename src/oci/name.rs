//! Repository names, tags and manifest references, validated against the distribution
//! grammar before anything else sees them.

use std::fmt;
use std::str::FromStr;

use super::digest::{Digest, DigestError};

/// Longest repository name accepted (distribution's limit, keeps file and key sizes sane).
pub const MAX_NAME_LEN: usize = 255;

/// Longest tag accepted (the spec's grammar allows 128 characters).
pub const MAX_TAG_LEN: usize = 128;

/// Why a repository name, tag or reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("repository name component {0:?} does not match the name grammar")]
    BadComponent(String),
    #[error("tag does not match the tag grammar")]
    BadTag,
    #[error("invalid digest: {0}")]
    BadDigest(#[from] DigestError),
}

/// A validated repository name: `/`-separated components of `[a-z0-9]+` joined by
/// `.`, `_`, `__` or runs of `-`. No component can be `.` or `..`, so a name is always
/// safe to use as a key and never escapes a directory.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(Box<str>);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first path component (an upstream's name when the repository is routed by prefix).
    pub fn first_component(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }

    /// The name without its first component, if it has more than one.
    pub fn strip_first_component(&self) -> Option<RepoName> {
        self.0
            .split_once('/')
            .map(|(_, rest)| RepoName(rest.into()))
    }

    /// `prefix/self`, validated (the result may be too long).
    pub fn with_prefix(&self, prefix: &str) -> Result<RepoName, NameError> {
        format!("{prefix}/{}", self.0).parse()
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", always followed by alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<RepoName, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        for component in s.split('/') {
            if !valid_component(component) {
                let shown: String = component.chars().take(64).collect();
                return Err(NameError::BadComponent(shown));
            }
        }
        Ok(RepoName(s.into()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoName({})", self.0)
    }
}

/// A validated tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Box<str>);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Tag, NameError> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
        let rest_ok = b
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
        if !first_ok || !rest_ok || b.len() > MAX_TAG_LEN {
            return Err(NameError::BadTag);
        }
        Ok(Tag(s.into()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", self.0)
    }
}

/// What a manifest URL names: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Reference, NameError> {
        // A tag can never contain ':', so its presence decides.
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_grammar_examples() {
        for ok in [
            "a",
            "library/alpine",
            "docker.io/library/alpine",
            "a-b/c__d/e.f/g_h",
            "a---b",
            "x0/y1/z2",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_hostile_names() {
        for bad in [
            "",
            "..",
            "a/../b",
            "a/./b",
            "/a",
            "a/",
            "a//b",
            "A",
            "a_-b",
            "a___b",
            "-a",
            "a.",
            "a b",
            "a%2f..",
            "central.corp:5000/team",
            "a\0b",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert_eq!(long.parse::<RepoName>(), Err(NameError::TooLong));
    }

    #[test]
    fn tags_follow_grammar() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_v1.2-rc.3".parse::<Tag>().is_ok());
        assert!("sha256-abc.sig".parse::<Tag>().is_ok());
        assert!("a".repeat(128).parse::<Tag>().is_ok());
        for bad in ["", ".hidden", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reference_distinguishes_tag_and_digest() {
        assert!(matches!("v1".parse::<Reference>(), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!(matches!(
            "sha256:xyz".parse::<Reference>(),
            Err(NameError::BadDigest(_))
        ));
    }

    #[test]
    fn prefix_helpers() {
        let n: RepoName = "docker.io/library/alpine".parse().expect("valid");
        assert_eq!(n.first_component(), "docker.io");
        assert_eq!(
            n.strip_first_component().map(|r| r.to_string()).as_deref(),
            Some("library/alpine")
        );
    }
}
