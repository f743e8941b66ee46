//! Content digests (`algorithm:hex`) and the streaming hasher that produces them.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A digest algorithm this registry can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Why a digest string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest has no algorithm separator")]
    Malformed,
    #[error("unsupported digest algorithm")]
    UnsupportedAlgorithm,
    #[error("digest encoding is not lowercase hex of the right length")]
    BadEncoding,
}

/// A validated digest such as `sha256:<64 lowercase hex>`.
///
/// Only sha256 and sha512 are accepted; the string form is canonical, so equality of
/// `Digest` values is equality of content.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    /// The whole canonical string, `algorithm:hex`.
    text: Box<str>,
}

impl Digest {
    /// The digest of `bytes` under `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut hasher = Hasher::new(algorithm);
        hasher.update(bytes);
        hasher.finish()
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, bytes)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex part, without the algorithm prefix.
    pub fn hex(&self) -> &str {
        &self.text[self.algorithm.as_str().len() + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        let (algo, hex) = s.split_once(':').ok_or(DigestError::Malformed)?;
        let algorithm = match algo {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            // The grammar allows other algorithms; we cannot verify them, so refuse.
            a if !a.is_empty()
                && a.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b)
                }) =>
            {
                return Err(DigestError::UnsupportedAlgorithm);
            }
            _ => return Err(DigestError::Malformed),
        };
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::BadEncoding);
        }
        Ok(Digest {
            algorithm,
            text: s.into(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.text)
    }
}

/// Incremental hashing of a byte stream into a [`Digest`].
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest {
            algorithm,
            text: format!("{}:{hex}", algorithm.as_str()).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_sha256_matches_known_value() {
        assert_eq!(
            Digest::sha256_of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parses_canonical_forms() {
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .expect("valid");
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex().len(), 64);
        let long = format!("sha512:{}", "a".repeat(128));
        assert!(long.parse::<Digest>().is_ok());
    }

    #[test]
    fn refuses_bad_digests() {
        let cases = [
            ("", DigestError::Malformed),
            ("sha256", DigestError::Malformed),
            ("sha256:", DigestError::BadEncoding),
            ("sha256:abc", DigestError::BadEncoding),
            (
                "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
                DigestError::BadEncoding,
            ),
            (
                "md5:d41d8cd98f00b204e9800998ecf8427e",
                DigestError::UnsupportedAlgorithm,
            ),
            (":abc", DigestError::Malformed),
            ("../../etc:passwd", DigestError::Malformed),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Digest>(), Err(want), "{input:?}");
        }
        let traversal = format!("sha256:{}/..", "a".repeat(61));
        assert!(traversal.parse::<Digest>().is_err());
    }

    #[test]
    fn incremental_equals_one_shot() {
        let mut h = Hasher::new(Algorithm::Sha512);
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Digest::of(Algorithm::Sha512, b"hello world"));
    }
}
