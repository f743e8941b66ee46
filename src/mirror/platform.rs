//! The platforms a mirror job narrows image indexes to: `os/arch[/variant]`, as in
//! `linux/amd64` or `linux/arm64/v8`. Pure.

use std::fmt;
use std::str::FromStr;

/// One platform of a job's `platforms` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// When `None`, every variant of the architecture is selected.
    pub variant: Option<String>,
}

impl Platform {
    /// Whether an index entry for `os`/`architecture`/`variant` is selected.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == architecture
            && self.variant.as_deref().is_none_or(|v| Some(v) == variant)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        };
        match parts[..] {
            [os, arch] if valid(os) && valid(arch) => Ok(Platform {
                os: os.to_owned(),
                architecture: arch.to_owned(),
                variant: None,
            }),
            [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => Ok(Platform {
                os: os.to_owned(),
                architecture: arch.to_owned(),
                variant: Some(variant.to_owned()),
            }),
            _ => Err(format!(
                "{s:?} is not a platform like linux/amd64 or linux/arm64/v8 (os/arch[/variant], lowercase)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches_with_and_without_variant() {
        let amd64: Platform = "linux/amd64".parse().expect("valid");
        assert!(amd64.matches("linux", "amd64", None));
        assert!(amd64.matches("linux", "amd64", Some("v3")));
        assert!(!amd64.matches("linux", "arm64", None));
        let v7: Platform = "linux/arm/v7".parse().expect("valid");
        assert_eq!(v7.to_string(), "linux/arm/v7");
        assert!(v7.matches("linux", "arm", Some("v7")));
        assert!(!v7.matches("linux", "arm", Some("v6")));
        assert!(!v7.matches("linux", "arm", None));
        for bad in [
            "linux",
            "linux/",
            "Linux/amd64",
            "linux/amd64/v8/x",
            "linux amd64",
        ] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }
}
