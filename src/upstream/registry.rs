//! The configured upstreams, built once in the composition root and shared by everything
//! that talks to an upstream (pull-through, central logins, mirroring): one client per
//! upstream, so one circuit breaker, one token cache and one rate-limit reading each.
//!
//! Owns the lookup of an upstream by its configured name, or by any host clients may
//! write for it (name, aliases, Docker Hub's historic hosts). Upstreams are named by an
//! [`UpstreamId`] or carried as an [`UpstreamHandle`]; never by a position in the
//! configuration. Building it reads the credential and CA files; it opens no connection.

use std::sync::Arc;
use std::time::Duration;

use super::{Upstream, UpstreamError};
use crate::config::Config;

/// One configured upstream, valid within the [`Upstreams`] that issued it. Cheap to copy
/// and compare; only the registry makes them, so an id always names a real upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamId(usize);

/// One upstream: its client and the pull-through settings that belong to it. Cheap to
/// clone (the client is shared, and with it the circuit breaker). Handles compare by id.
#[derive(Clone)]
pub struct UpstreamHandle {
    id: UpstreamId,
    client: Upstream,
    tag_ttl: Duration,
    revalidate_wait: Duration,
}

impl UpstreamHandle {
    pub fn id(&self) -> UpstreamId {
        self.id
    }

    /// The configured name (`docker.io`): the first component of canonical names, and
    /// the label of metrics and logs.
    pub fn name(&self) -> &str {
        self.client.name()
    }

    /// The client, shared by every holder of this upstream.
    pub fn client(&self) -> &Upstream {
        &self.client
    }

    /// How long a tag answer is trusted before it is revalidated.
    pub fn tag_ttl(&self) -> Duration {
        self.tag_ttl
    }

    /// How long a client waits for a due revalidation before the last answer is served.
    pub fn revalidate_wait(&self) -> Duration {
        self.revalidate_wait
    }
}

impl PartialEq for UpstreamHandle {
    fn eq(&self, other: &UpstreamHandle) -> bool {
        self.id == other.id
    }
}

impl Eq for UpstreamHandle {}

impl std::fmt::Debug for UpstreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamHandle")
            .field("id", &self.id)
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}

/// Every configured upstream. Cheap to clone.
#[derive(Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

struct Inner {
    /// In configuration order; `UpstreamId(i)` is `handles[i]`.
    handles: Vec<UpstreamHandle>,
    /// Every host clients may write for an upstream: its name, then its aliases.
    hosts: Vec<(String, UpstreamId)>,
    /// The `host[:port]` of our own public URL: an `ns` naming it means hosted.
    own_host: String,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.inner.handles).finish()
    }
}

impl Upstreams {
    /// Builds a client for every configured upstream (reads password and CA files).
    pub fn new(config: &Config) -> Result<Upstreams, UpstreamError> {
        let mut handles = Vec::with_capacity(config.upstreams.len());
        let mut hosts = Vec::new();
        for (i, u) in config.upstreams.iter().enumerate() {
            let id = UpstreamId(i);
            handles.push(UpstreamHandle {
                id,
                client: Upstream::new(u)?,
                tag_ttl: u.tag_ttl,
                revalidate_wait: u.revalidate_wait,
            });
            // Names and aliases are unique across upstreams (the config checks it).
            hosts.extend(
                std::iter::once(&u.name)
                    .chain(&u.aliases)
                    .map(|h| (h.clone(), id)),
            );
        }
        Ok(Upstreams {
            inner: Arc::new(Inner {
                handles,
                hosts,
                own_host: own_host(&config.server.public_url).to_owned(),
            }),
        })
    }

    /// The upstream configured under `name` (its name, not an alias): how `auth.central`
    /// and mirror jobs refer to one.
    pub fn by_name(&self, name: &str) -> Option<&UpstreamHandle> {
        self.iter().find(|h| h.name() == name)
    }

    /// The upstream a client means by the registry host `host`: its name or one of its
    /// aliases; Docker Hub's historic hosts (`index.docker.io`, `registry-1.docker.io`)
    /// mean `docker.io`.
    pub fn by_host(&self, host: &str) -> Option<&UpstreamHandle> {
        let host = match host {
            "index.docker.io" | "registry-1.docker.io" => "docker.io",
            other => other,
        };
        let (_, id) = self.inner.hosts.iter().find(|(h, _)| h == host)?;
        self.inner.handles.get(id.0)
    }

    /// Every upstream, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &UpstreamHandle> {
        self.inner.handles.iter()
    }

    /// The `host[:port]` of our own public URL.
    pub(super) fn own_host(&self) -> &str {
        &self.inner.own_host
    }
}

/// The `host[:port]` of a URL.
fn own_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(u: &Upstreams, host: &str) -> Option<String> {
        u.by_host(host).map(|h| h.name().to_owned())
    }

    #[test]
    fn default_config_knows_docker_hub_by_its_historic_hosts() {
        let c = Config::embedded_default().expect("default config");
        let u = Upstreams::new(&c).expect("upstreams");
        assert_eq!(u.iter().count(), 3);
        for host in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(names(&u, host).as_deref(), Some("docker.io"), "{host}");
        }
        assert_eq!(names(&u, "example.com"), None);
    }

    #[test]
    fn names_and_aliases_find_one_upstream_and_ids_tell_them_apart() {
        let c = Config::from_toml(
            r#"
            [server]
            listen = ["127.0.0.1:5000"]
            public_url = "https://outpost.site:5443/"
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
        let u = Upstreams::new(&c).expect("upstreams");
        let central = u.by_name("central.corp").expect("by name");
        assert_eq!(u.by_host("central.corp:5000"), Some(central));
        assert_eq!(u.by_host("central.corp"), Some(central));
        // Aliases are hosts, not names.
        assert!(u.by_name("central.corp:5000").is_none());
        let hub = u.by_name("docker.io").expect("docker.io");
        assert_ne!(hub.id(), central.id());
        assert_eq!(hub.tag_ttl(), c.upstreams[0].tag_ttl);
        assert_eq!(central.revalidate_wait(), c.upstreams[1].revalidate_wait);
        assert_eq!(u.own_host(), "outpost.site:5443");
    }
}
