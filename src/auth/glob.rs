//! Repository globs: the one definition of how `team/*` and `team/**` match repository
//! names, shared by API key scopes and access rules so the two can never disagree.
//!
//! `*`, `?` and classes never cross a `/`: `team/*` matches `team/app` but not
//! `team/a/b`; `team/**` matches any depth below `team`, and `**` alone matches every
//! name.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::oci::RepoName;

/// A repository glob that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid repository glob {glob:?}: {reason}")]
pub struct GlobError {
    pub glob: String,
    pub reason: String,
}

/// A compiled list of repository globs; a name matches if any glob does (none if empty).
#[derive(Clone, Debug)]
pub(crate) struct RepoGlobs(GlobSet);

impl RepoGlobs {
    /// Compiles every glob, reporting every one that is invalid.
    pub(crate) fn compile<S: AsRef<str>>(globs: &[S]) -> Result<RepoGlobs, Vec<GlobError>> {
        let mut set = GlobSetBuilder::new();
        let mut errors = Vec::new();
        for glob in globs {
            match repo_glob(glob.as_ref()) {
                Ok(g) => {
                    set.add(g);
                }
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        set.build().map(RepoGlobs).map_err(|e| {
            vec![GlobError {
                glob: e.glob().unwrap_or_default().to_owned(),
                reason: e.kind().to_string(),
            }]
        })
    }

    pub(crate) fn is_match(&self, repo: &RepoName) -> bool {
        self.0.is_match(repo.as_str())
    }
}

fn repo_glob(glob: &str) -> Result<globset::Glob, GlobError> {
    let error = |reason: String| GlobError {
        glob: glob.to_owned(),
        reason,
    };
    // An empty glob would silently match nothing, which is never what was meant.
    if glob.trim().is_empty() {
        return Err(error("glob is empty".to_owned()));
    }
    GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map_err(|e| error(e.kind().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(globs: &[&str], name: &str) -> bool {
        let repo: RepoName = name.parse().expect("valid name");
        RepoGlobs::compile(globs)
            .expect("valid globs")
            .is_match(&repo)
    }

    #[test]
    fn single_star_stays_within_one_component() {
        assert!(matches(&["team/*"], "team/app"));
        assert!(!matches(&["team/*"], "team/a/b"));
        assert!(!matches(&["team/*"], "other/app"));
        assert!(!matches(&["team/*"], "team"));
    }

    #[test]
    fn double_star_matches_any_depth_below() {
        assert!(matches(&["team/**"], "team/app"));
        assert!(matches(&["team/**"], "team/a/b/c"));
        assert!(!matches(&["team/**"], "teammate/app"));
    }

    #[test]
    fn double_star_alone_matches_everything() {
        for name in ["a", "docker.io/library/alpine", "x/y/z/w"] {
            assert!(matches(&["**"], name), "{name}");
        }
    }

    #[test]
    fn any_glob_in_the_list_suffices() {
        assert!(matches(&["a/*", "b/**"], "b/c/d"));
        assert!(!matches(&[] as &[&str], "a"));
    }

    #[test]
    fn every_invalid_glob_is_reported() {
        let errs = RepoGlobs::compile(&["a/[", "ok/*", "", "b/{x"]).expect_err("invalid");
        let globs: Vec<&str> = errs.iter().map(|e| e.glob.as_str()).collect();
        assert_eq!(globs, ["a/[", "", "b/{x"]);
    }
}
