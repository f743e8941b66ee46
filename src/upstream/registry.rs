//! The configured upstreams, built in the composition root and shared by everything that
//! talks to an upstream (pull-through, central logins, mirroring): one client per
//! upstream, so one circuit breaker, one token cache and one rate-limit reading each. A
//! configuration reload replaces the set in one step, keeping every unchanged client.
//!
//! Owns the lookup of an upstream by its configured name, or by any host clients may
//! write for it (name, aliases, Docker Hub's historic hosts). Upstreams are carried as an
//! [`UpstreamHandle`] (or named by their configured name); never by a position in the
//! configuration. Building it reads the credential and CA files; it opens no connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::{Upstream, UpstreamError};
use crate::config::{Changes, Config};

/// One upstream client, never reused for another (a changed upstream gets a new id at a
/// reload). Cheap to copy and compare; only the registry makes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct UpstreamId(usize);

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

/// Every configured upstream. Cheap to clone; clones share one set, which a reload
/// replaces ([`Upstreams::stage`], [`Upstreams::install`]). Lookups hand out handles:
/// a request keeps the one it started with, whatever a reload does meanwhile.
#[derive(Clone)]
pub struct Upstreams {
    current: Arc<RwLock<Arc<Set>>>,
}

/// One generation of the configured upstreams.
pub struct Set {
    /// In configuration order.
    handles: Vec<UpstreamHandle>,
    /// Every host clients may write for an upstream: its name, then its aliases.
    hosts: Vec<(String, UpstreamId)>,
    /// The `host[:port]` of our own public URL: an `ns` naming it means hosted.
    own_host: String,
}

/// Ids are never reused, across reloads included.
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl Set {
    /// Builds the upstreams of `config`, keeping from `previous` every client whose
    /// settings and files are unchanged.
    fn build(config: &Config, previous: Option<&Set>) -> Result<Set, UpstreamError> {
        let mut handles = Vec::with_capacity(config.upstreams.len());
        let mut hosts = Vec::new();
        for u in &config.upstreams {
            let fresh = Upstream::new(u)?;
            let kept = previous
                .and_then(|p| p.handles.iter().find(|h| h.name() == u.name))
                .filter(|h| h.client.same_settings(&fresh));
            let (id, client) = match kept {
                Some(h) => (h.id, h.client.clone()),
                None => (UpstreamId(NEXT_ID.fetch_add(1, Ordering::Relaxed)), fresh),
            };
            handles.push(UpstreamHandle {
                id,
                client,
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
        Ok(Set {
            handles,
            hosts,
            own_host: own_host(&config.server.public_url).to_owned(),
        })
    }

    /// What differs from `previous`, by upstream name: added, changed (settings or
    /// credential and CA files), removed.
    pub fn changes(&self, previous: &Upstreams) -> Changes {
        // Every setting is in a client's digest: a change makes a new client.
        Changes::between(
            &previous.snapshot().handles,
            &self.handles,
            |h| h.name(),
            |a, b| a.id == b.id,
        )
    }
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.snapshot().handles).finish()
    }
}

impl Upstreams {
    /// Builds a client for every configured upstream (reads password and CA files).
    pub fn new(config: &Config) -> Result<Upstreams, UpstreamError> {
        Ok(Upstreams {
            current: Arc::new(RwLock::new(Arc::new(Set::build(config, None)?))),
        })
    }

    /// The upstreams of a new configuration, built and checked but not in use yet:
    /// clients whose settings and files are unchanged are kept (with their breaker,
    /// tokens and readings); changed ones are new. Our own host stays the running one
    /// (`[server]` changes need a restart).
    pub fn stage(&self, config: &Config) -> Result<Set, UpstreamError> {
        let running = self.snapshot();
        let mut set = Set::build(config, Some(&running))?;
        set.own_host.clone_from(&running.own_host);
        Ok(set)
    }

    /// Puts a staged set in use: requests that start afterwards see it; those in flight
    /// finish with the upstream they started with.
    pub fn install(&self, set: Set) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Arc::new(set);
    }

    fn snapshot(&self) -> Arc<Set> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&current)
    }

    /// The upstream configured under `name` (its name, not an alias): how `auth.central`
    /// and mirror jobs refer to one.
    pub fn by_name(&self, name: &str) -> Option<UpstreamHandle> {
        self.snapshot()
            .handles
            .iter()
            .find(|h| h.name() == name)
            .cloned()
    }

    /// The upstream a client means by the registry host `host`: its name or one of its
    /// aliases; Docker Hub's historic hosts (`index.docker.io`, `registry-1.docker.io`)
    /// mean `docker.io`.
    pub fn by_host(&self, host: &str) -> Option<UpstreamHandle> {
        let host = match host {
            "index.docker.io" | "registry-1.docker.io" => "docker.io",
            other => other,
        };
        let set = self.snapshot();
        let (_, id) = set.hosts.iter().find(|(h, _)| h == host)?;
        set.handles.iter().find(|h| h.id == *id).cloned()
    }

    /// Every upstream, in configuration order.
    pub fn all(&self) -> Vec<UpstreamHandle> {
        self.snapshot().handles.clone()
    }

    /// The `host[:port]` of our own public URL.
    pub(super) fn own_host(&self) -> String {
        self.snapshot().own_host.clone()
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
        assert_eq!(u.all().len(), 3);
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
        assert_eq!(u.by_host("central.corp:5000").as_ref(), Some(&central));
        assert_eq!(u.by_host("central.corp").as_ref(), Some(&central));
        // Aliases are hosts, not names.
        assert!(u.by_name("central.corp:5000").is_none());
        let hub = u.by_name("docker.io").expect("docker.io");
        assert_ne!(hub, central);
        assert_eq!(hub.tag_ttl(), c.upstreams[0].tag_ttl);
        assert_eq!(central.revalidate_wait(), c.upstreams[1].revalidate_wait);
        assert_eq!(u.own_host(), "outpost.site:5443");
    }

    fn config(upstreams: &str) -> Config {
        Config::from_toml(&format!(
            "[server]\nlisten = [\"127.0.0.1:5000\"]\npublic_url = \"http://127.0.0.1:5000/\"\n[storage]\npath = \"/tmp/x\"\n{upstreams}"
        ))
        .expect("valid config")
    }

    fn upstream(name: &str, extra: &str) -> String {
        format!("[[upstream]]\nname = \"{name}\"\nurl = \"https://{name}\"\n{extra}\n")
    }

    /// A reload keeps the clients (breaker, tokens) of unchanged upstreams, replaces the
    /// one whose password file changed, and a handle taken before keeps working.
    #[test]
    fn a_staged_set_keeps_unchanged_clients_and_replaces_changed_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let password = dir.path().join("password");
        std::fs::write(&password, "one").expect("password");
        let creds = format!(
            "username = \"site\"\npassword_file = \"{}\"",
            password.display()
        );
        let old = config(
            &[
                upstream("a.corp", &creds),
                upstream("b.corp", ""),
                upstream("c.corp", ""),
            ]
            .concat(),
        );
        let u = Upstreams::new(&old).expect("upstreams");
        let (a, b) = (
            u.by_name("a.corp").expect("a"),
            u.by_name("b.corp").expect("b"),
        );

        std::fs::write(&password, "two").expect("password");
        let new = config(
            &[
                upstream("a.corp", &creds),
                upstream("b.corp", ""),
                upstream("d.corp", "aliases = [\"d.corp:5000\"]"),
            ]
            .concat(),
        );
        let staged = u.stage(&new).expect("staged");
        assert_eq!(
            staged.changes(&u),
            Changes {
                added: vec!["d.corp".to_owned()],
                changed: vec!["a.corp".to_owned()],
                removed: vec!["c.corp".to_owned()],
            }
        );
        assert!(u.by_name("d.corp").is_none(), "staged is not in use yet");
        u.install(staged);
        assert_eq!(u.by_name("b.corp").as_ref(), Some(&b), "b keeps its client");
        assert_ne!(u.by_name("a.corp").as_ref(), Some(&a), "a has a new client");
        assert_eq!(names(&u, "d.corp:5000").as_deref(), Some("d.corp"));
        assert!(u.by_name("c.corp").is_none());
        assert_eq!(a.name(), "a.corp", "a handle from before still works");
        assert!(u.stage(&new).expect("again").changes(&u).is_empty());

        std::fs::remove_file(&password).expect("remove");
        assert!(u.stage(&new).is_err(), "a missing password file refuses");
        assert_eq!(u.all().len(), 3, "and the running set stays");
    }
}
