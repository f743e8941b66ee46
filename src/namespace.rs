//! Which registry a requested repository belongs to (PRODUCT.md §1): the containerd
//! mirror form (`?ns=<host>`), the path-prefix form (`/v2/<host>/<path>`), or hosted here.
//!
//! The result carries the *canonical* name (`docker.io/library/alpine`) that policy,
//! storage and logs use, and for upstream repositories the name at the upstream
//! (`library/alpine`). Pure: no I/O.

use crate::config::Config;
use crate::oci::{NameError, RepoName};

/// Where a repository lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespace {
    Hosted,
    /// Pull-through: `index` into `Config::upstreams`, `remote` the name there.
    Upstream {
        index: usize,
        remote: RepoName,
    },
}

/// A repository name resolved to its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub canonical: RepoName,
    pub namespace: Namespace,
}

/// Why a repository could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error("no upstream is configured for namespace {0:?}")]
    UnknownNamespace(String),
    #[error(transparent)]
    Name(#[from] NameError),
}

/// The `host[:port]` of the public URL: an `ns` naming Outpost itself means hosted.
fn own_host(config: &Config) -> &str {
    let url = &config.server.public_url;
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// Resolves `requested` (the name in the URL) with the request's `ns` query value.
pub fn resolve(
    config: &Config,
    requested: &RepoName,
    ns: Option<&str>,
) -> Result<Resolved, NamespaceError> {
    let hosted = || Resolved {
        canonical: requested.clone(),
        namespace: Namespace::Hosted,
    };
    if let Some(ns) = ns.filter(|n| !n.is_empty()) {
        if ns == own_host(config) {
            return Ok(hosted());
        }
        let index = config
            .upstream_index(ns)
            .ok_or_else(|| NamespaceError::UnknownNamespace(ns.chars().take(100).collect()))?;
        return upstream(config, index, requested.clone());
    }
    if let Some(rest) = requested.strip_first_component()
        && let Some(index) = config.upstream_index(requested.first_component())
    {
        return upstream(config, index, rest);
    }
    Ok(hosted())
}

fn upstream(config: &Config, index: usize, remote: RepoName) -> Result<Resolved, NamespaceError> {
    let name = config
        .upstreams
        .get(index)
        .map(|u| u.name.as_str())
        .unwrap_or_default();
    // Docker Hub's official images live under `library/`.
    let remote = if name == "docker.io" && remote.strip_first_component().is_none() {
        remote.with_prefix("library")?
    } else {
        remote
    };
    Ok(Resolved {
        canonical: remote.with_prefix(name)?,
        namespace: Namespace::Upstream { index, remote },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml(
            r#"
            [server]
            listen = ["127.0.0.1:5000"]
            public_url = "http://outpost.site:5000"
            [storage]
            path = "/tmp/x"
            [[upstream]]
            name = "docker.io"
            url = "https://registry-1.docker.io"
            [[upstream]]
            name = "central.corp"
            url = "https://central.corp:5000"
            aliases = ["central.corp:5000"]
            "#,
        )
        .expect("valid config")
    }

    fn name(s: &str) -> RepoName {
        s.parse().expect("valid name")
    }

    fn up(index: usize, canonical: &str, remote: &str) -> Resolved {
        Resolved {
            canonical: name(canonical),
            namespace: Namespace::Upstream {
                index,
                remote: name(remote),
            },
        }
    }

    #[test]
    fn ns_query_names_the_upstream() {
        let c = config();
        let r = resolve(&c, &name("library/alpine"), Some("docker.io"));
        assert_eq!(r, Ok(up(0, "docker.io/library/alpine", "library/alpine")));
        let r = resolve(&c, &name("alpine"), Some("registry-1.docker.io"));
        assert_eq!(r, Ok(up(0, "docker.io/library/alpine", "library/alpine")));
        let r = resolve(&c, &name("team/app"), Some("central.corp:5000"));
        assert_eq!(r, Ok(up(1, "central.corp/team/app", "team/app")));
    }

    #[test]
    fn unknown_ns_is_refused_and_own_host_is_hosted() {
        let c = config();
        assert!(matches!(
            resolve(&c, &name("a/b"), Some("evil.example")),
            Err(NamespaceError::UnknownNamespace(_))
        ));
        let r = resolve(&c, &name("a/b"), Some("outpost.site:5000")).expect("hosted");
        assert_eq!(r.namespace, Namespace::Hosted);
        let r = resolve(&c, &name("a/b"), Some("")).expect("hosted");
        assert_eq!(r.namespace, Namespace::Hosted);
    }

    #[test]
    fn path_prefix_names_the_upstream() {
        let c = config();
        let r = resolve(&c, &name("docker.io/alpine"), None);
        assert_eq!(r, Ok(up(0, "docker.io/library/alpine", "library/alpine")));
        let r = resolve(&c, &name("docker.io/bitnami/redis"), None);
        assert_eq!(r, Ok(up(0, "docker.io/bitnami/redis", "bitnami/redis")));
        let r = resolve(&c, &name("central.corp/team/app"), None);
        assert_eq!(r, Ok(up(1, "central.corp/team/app", "team/app")));
    }

    #[test]
    fn everything_else_is_hosted() {
        let c = config();
        for n in ["team/app", "docker.io", "dockerio/x", "central.corp.evil/x"] {
            let r = resolve(&c, &name(n), None).expect("hosted");
            assert_eq!(r.namespace, Namespace::Hosted, "{n}");
            assert_eq!(r.canonical.as_str(), n);
        }
    }
}
