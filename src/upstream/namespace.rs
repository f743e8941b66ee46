//! Which registry a requested repository belongs to: the containerd mirror form
//! (`?ns=<host>`), the path-prefix form (`/v2/<host>/<path>`), or hosted here.
//!
//! The result carries the *canonical* name (`docker.io/library/alpine`) that policy,
//! storage and logs use, and for upstream repositories the upstream and the name there
//! (`library/alpine`). Pure: no I/O.

use super::registry::{UpstreamHandle, Upstreams};
use crate::oci::{NameError, RepoName};

/// Where a repository lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespace {
    Hosted,
    /// Pull-through from `upstream`; `remote` is the name there.
    Upstream {
        upstream: UpstreamHandle,
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

impl Upstreams {
    /// Resolves `requested` (the name in the URL) with the request's `ns` query value. An
    /// `ns` naming Outpost itself means hosted; one naming no upstream is refused.
    pub fn resolve(
        &self,
        requested: &RepoName,
        ns: Option<&str>,
    ) -> Result<Resolved, NamespaceError> {
        let hosted = || Resolved {
            canonical: requested.clone(),
            namespace: Namespace::Hosted,
        };
        if let Some(ns) = ns.filter(|n| !n.is_empty()) {
            if ns == self.own_host() {
                return Ok(hosted());
            }
            let upstream = self
                .by_host(ns)
                .ok_or_else(|| NamespaceError::UnknownNamespace(ns.chars().take(100).collect()))?;
            return in_upstream(upstream, requested.clone());
        }
        if let Some(rest) = requested.strip_first_component()
            && let Some(upstream) = self.by_host(requested.first_component())
        {
            return in_upstream(upstream, rest);
        }
        Ok(hosted())
    }
}

fn in_upstream(upstream: UpstreamHandle, remote: RepoName) -> Result<Resolved, NamespaceError> {
    let name = upstream.name();
    // Docker Hub's official images live under `library/`.
    let remote = if name == "docker.io" && remote.strip_first_component().is_none() {
        remote.with_prefix("library")?
    } else {
        remote
    };
    Ok(Resolved {
        canonical: remote.with_prefix(name)?,
        namespace: Namespace::Upstream { upstream, remote },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn upstreams() -> Upstreams {
        let config = Config::from_toml(
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
        .expect("valid config");
        Upstreams::new(&config).expect("upstreams")
    }

    fn name(s: &str) -> RepoName {
        s.parse().expect("valid name")
    }

    fn up(u: &Upstreams, upstream: &str, canonical: &str, remote: &str) -> Resolved {
        Resolved {
            canonical: name(canonical),
            namespace: Namespace::Upstream {
                upstream: u.by_name(upstream).expect("configured").clone(),
                remote: name(remote),
            },
        }
    }

    #[test]
    fn ns_query_names_the_upstream() {
        let u = upstreams();
        let r = u.resolve(&name("library/alpine"), Some("docker.io"));
        let hub = up(
            &u,
            "docker.io",
            "docker.io/library/alpine",
            "library/alpine",
        );
        assert_eq!(r, Ok(hub.clone()));
        let r = u.resolve(&name("alpine"), Some("registry-1.docker.io"));
        assert_eq!(r, Ok(hub));
        let r = u.resolve(&name("team/app"), Some("central.corp:5000"));
        let central = up(&u, "central.corp", "central.corp/team/app", "team/app");
        assert_eq!(r, Ok(central));
    }

    #[test]
    fn unknown_ns_is_refused_and_own_host_is_hosted() {
        let u = upstreams();
        assert!(matches!(
            u.resolve(&name("a/b"), Some("evil.example")),
            Err(NamespaceError::UnknownNamespace(_))
        ));
        let r = u
            .resolve(&name("a/b"), Some("outpost.site:5000"))
            .expect("hosted");
        assert_eq!(r.namespace, Namespace::Hosted);
        let r = u.resolve(&name("a/b"), Some("")).expect("hosted");
        assert_eq!(r.namespace, Namespace::Hosted);
    }

    #[test]
    fn path_prefix_names_the_upstream() {
        let u = upstreams();
        let r = u.resolve(&name("docker.io/alpine"), None);
        let want = up(
            &u,
            "docker.io",
            "docker.io/library/alpine",
            "library/alpine",
        );
        assert_eq!(r, Ok(want));
        let r = u.resolve(&name("docker.io/bitnami/redis"), None);
        let want = up(&u, "docker.io", "docker.io/bitnami/redis", "bitnami/redis");
        assert_eq!(r, Ok(want));
        let r = u.resolve(&name("central.corp/team/app"), None);
        let want = up(&u, "central.corp", "central.corp/team/app", "team/app");
        assert_eq!(r, Ok(want));
    }

    #[test]
    fn everything_else_is_hosted() {
        let u = upstreams();
        for n in ["team/app", "docker.io", "dockerio/x", "central.corp.evil/x"] {
            let r = u.resolve(&name(n), None).expect("hosted");
            assert_eq!(r.namespace, Namespace::Hosted, "{n}");
            assert_eq!(r.canonical.as_str(), n);
        }
    }
}
