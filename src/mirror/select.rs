//! Which tags of a repository a mirror job selects.
//!
//! A job gives one or more filters; a tag is selected when every filter given agrees:
//! - `tags`: globs (`v*`, `1.?`); `*` and `?` match any characters.
//! - `tag_regex`: a regular expression that must match the whole tag (it is anchored:
//!   `v1\..*` does not select `xv1.0`).
//! - `semver`: a version range (`">=1.2, <2"`). A leading `v` is ignored; tags that are
//!   not semantic versions (`latest`, `1.2`) are left out; pre-releases fall outside a
//!   range unless one of its bounds names a pre-release of the same version (Cargo's rule).
//! - `keep_newest = N`: of the tags the other filters selected, the N highest by semantic
//!   version precedence (leading `v` ignored, non-versions left out, pre-releases counted
//!   and ordered below their release).
//!
//! A job must give at least one filter: mirroring every tag of a repository to every site
//! is never what a fleet wants by accident. Tags of the referrer tag schema
//! (`sha256-<hex>`, `.sig`, `.att`, `.sbom`) are never selected by filters; they come with
//! `referrers = true`. Pure: no I/O.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use regex::Regex;
use semver::{Version, VersionReq};

/// A job's compiled tag filters.
#[derive(Clone, Debug)]
pub struct TagFilter {
    globs: Option<GlobSet>,
    regex: Option<Regex>,
    semver: Option<VersionReq>,
    keep_newest: Option<usize>,
}

/// The raw filter settings of a job, as written in the config.
#[derive(Clone, Copy, Debug, Default)]
pub struct FilterSpec<'a> {
    pub tags: &'a [String],
    pub tag_regex: Option<&'a str>,
    pub semver: Option<&'a str>,
    pub keep_newest: Option<usize>,
}

impl TagFilter {
    /// Compiles the filters; every problem is reported, each naming its key.
    pub fn new(spec: FilterSpec<'_>) -> Result<TagFilter, Vec<String>> {
        let mut errors = Vec::new();
        let globs = if spec.tags.is_empty() {
            None
        } else {
            let mut set = GlobSetBuilder::new();
            for pattern in spec.tags {
                match GlobBuilder::new(pattern).literal_separator(false).build() {
                    Ok(g) => {
                        set.add(g);
                    }
                    Err(e) => errors.push(format!("tags: {pattern:?} is not a valid glob: {e}")),
                }
            }
            set.build()
                .map_err(|e| errors.push(format!("tags: {e}")))
                .ok()
        };
        let regex = spec.tag_regex.and_then(|r| {
            Regex::new(&format!("^(?:{r})$"))
                .map_err(|e| {
                    errors.push(format!(
                        "tag_regex: {r:?} is not a valid regular expression: {e}"
                    ))
                })
                .ok()
        });
        let semver = spec.semver.and_then(|r| {
            VersionReq::parse(r)
                .map_err(|e| {
                    errors.push(format!(
                        "semver: {r:?} is not a version range like \">=1.2, <2\": {e}"
                    ))
                })
                .ok()
        });
        if spec.keep_newest == Some(0) {
            errors.push("keep_newest: must be at least 1".to_owned());
        }
        if spec.tags.is_empty()
            && spec.tag_regex.is_none()
            && spec.semver.is_none()
            && spec.keep_newest.is_none()
        {
            errors.push(
                "no tag filter: give at least one of tags, tag_regex, semver or keep_newest \
                 (tags = [\"*\"] selects every tag)"
                    .to_owned(),
            );
        }
        if errors.is_empty() {
            Ok(TagFilter {
                globs,
                regex,
                semver,
                keep_newest: spec.keep_newest,
            })
        } else {
            Err(errors)
        }
    }

    /// The selected tags among `available`, sorted by name.
    pub fn select<'a>(&self, available: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut chosen: Vec<&str> = available
            .into_iter()
            .filter(|t| !is_referrer_tag(t))
            .filter(|t| self.globs.as_ref().is_none_or(|g| g.is_match(t)))
            .filter(|t| self.regex.as_ref().is_none_or(|r| r.is_match(t)))
            .filter(|t| {
                self.semver
                    .as_ref()
                    .is_none_or(|req| version_of(t).is_some_and(|v| req.matches(&v)))
            })
            .collect();
        if let Some(n) = self.keep_newest {
            let mut versioned: Vec<(Version, &str)> = chosen
                .iter()
                .filter_map(|t| Some((version_of(t)?, *t)))
                .collect();
            versioned.sort();
            chosen = versioned
                .into_iter()
                .rev()
                .take(n)
                .map(|(_, t)| t)
                .collect();
        }
        let mut out: Vec<String> = chosen.into_iter().map(str::to_owned).collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The semantic version a tag names: `1.2.3`, `v1.2.3-rc.1`; `None` for anything else.
pub fn version_of(tag: &str) -> Option<Version> {
    Version::parse(tag.strip_prefix('v').unwrap_or(tag)).ok()
}

/// Whether `tag` belongs to the referrer tag schema: `sha256-<64 hex>`, optionally with a
/// `.sig`, `.att` or `.sbom` suffix (cosign's signatures, attestations and SBOMs).
pub fn is_referrer_tag(tag: &str) -> bool {
    let Some(rest) = tag.strip_prefix("sha256-") else {
        return false;
    };
    let hex = [".sig", ".att", ".sbom"]
        .iter()
        .find_map(|suffix| rest.strip_suffix(suffix))
        .unwrap_or(rest);
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAGS: &[&str] = &[
        "latest",
        "v1.0.0",
        "v1.2.0",
        "1.2.5",
        "v1.3.0-rc.1",
        "v1.3.0",
        "v2.0.0-beta.1",
        "v2.0.0",
        "2.1",
        "nightly-2026-12-05",
        "sha256-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "sha256-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.sig",
    ];

    fn filter(spec: FilterSpec<'_>) -> TagFilter {
        TagFilter::new(spec).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn select(spec: FilterSpec<'_>) -> Vec<String> {
        filter(spec).select(TAGS.iter().copied())
    }

    fn owned(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|t| (*t).to_owned()).collect()
    }

    #[test]
    fn globs_select_by_pattern_and_never_referrer_tags() {
        let globs = owned(&["v1.*", "latest"]);
        let got = select(FilterSpec {
            tags: &globs,
            ..FilterSpec::default()
        });
        assert_eq!(
            got,
            owned(&["latest", "v1.0.0", "v1.2.0", "v1.3.0", "v1.3.0-rc.1"])
        );
        let every = owned(&["*"]);
        let all = select(FilterSpec {
            tags: &every,
            ..FilterSpec::default()
        });
        assert_eq!(all.len(), 10, "{all:?}");
        assert!(all.iter().all(|t| !t.starts_with("sha256-")));
    }

    #[test]
    fn the_regex_must_match_the_whole_tag() {
        let got = select(FilterSpec {
            tag_regex: Some(r"v1\.\d+\.0"),
            ..FilterSpec::default()
        });
        assert_eq!(got, owned(&["v1.0.0", "v1.2.0", "v1.3.0"]));
        let got = select(FilterSpec {
            tag_regex: Some("nightly"),
            ..FilterSpec::default()
        });
        assert!(got.is_empty(), "an unanchored match selected {got:?}");
    }

    #[test]
    fn semver_ranges_ignore_v_skip_non_versions_and_pre_releases() {
        let got = select(FilterSpec {
            semver: Some(">=1.2, <2"),
            ..FilterSpec::default()
        });
        // v1.3.0-rc.1 is outside: the range names no pre-release.
        assert_eq!(got, owned(&["1.2.5", "v1.2.0", "v1.3.0"]));
        let got = select(FilterSpec {
            semver: Some(">=2.0.0-beta.1"),
            ..FilterSpec::default()
        });
        // The range names a 2.0.0 pre-release, so 2.0.0's pre-releases count; "2.1" is
        // not a semantic version.
        assert_eq!(got, owned(&["v2.0.0", "v2.0.0-beta.1"]));
    }

    #[test]
    fn keep_newest_counts_pre_releases_below_their_release() {
        let got = select(FilterSpec {
            keep_newest: Some(3),
            ..FilterSpec::default()
        });
        assert_eq!(got, owned(&["v1.3.0", "v2.0.0", "v2.0.0-beta.1"]));
        let got = select(FilterSpec {
            keep_newest: Some(4),
            ..FilterSpec::default()
        });
        assert_eq!(
            got,
            owned(&["v1.3.0", "v1.3.0-rc.1", "v2.0.0", "v2.0.0-beta.1"])
        );
    }

    #[test]
    fn filters_intersect_and_keep_newest_applies_to_what_the_others_selected() {
        let globs = owned(&["v*"]);
        let got = select(FilterSpec {
            tags: &globs,
            semver: Some("^1"),
            keep_newest: Some(2),
            ..FilterSpec::default()
        });
        // The two newest of v1.0.0, v1.2.0, v1.3.0 (1.2.5 has no v; rc is out of range).
        assert_eq!(got, owned(&["v1.2.0", "v1.3.0"]));
    }

    #[test]
    fn bad_filters_are_named_and_no_filter_is_refused() {
        let globs = owned(&["[v"]);
        let e = TagFilter::new(FilterSpec {
            tags: &globs,
            tag_regex: Some("("),
            semver: Some("about 1"),
            keep_newest: Some(0),
        })
        .expect_err("invalid");
        let joined = e.join("\n");
        for key in ["tags:", "tag_regex:", "semver:", "keep_newest:"] {
            assert!(joined.contains(key), "{key} missing in {joined}");
        }
        let e = TagFilter::new(FilterSpec::default()).expect_err("no filter");
        assert!(e[0].contains("no tag filter"), "{e:?}");
    }

    #[test]
    fn referrer_tag_schema() {
        let hex = "0123456789abcdef".repeat(4);
        assert!(is_referrer_tag(&format!("sha256-{hex}")));
        for suffix in ["sig", "att", "sbom"] {
            assert!(is_referrer_tag(&format!("sha256-{hex}.{suffix}")));
        }
        assert!(!is_referrer_tag(&format!("sha256-{hex}.txt")));
        assert!(!is_referrer_tag("sha256-abc.sig"));
        assert!(!is_referrer_tag("v1.0.0"));
    }
}
