//! A string that must never be printed: keys, passwords and tokens live in this type.

use std::fmt;

use subtle::ConstantTimeEq;

/// A secret string. `Debug` and `Display` print `[REDACTED]`; the only way to the
/// bytes is [`Secret::expose`], which makes every use visible in review.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time equality, for comparing presented credentials.
    pub fn ct_eq(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "[REDACTED] [REDACTED]");
        assert!(s.ct_eq("hunter2") && !s.ct_eq("hunter3"));
    }
}
