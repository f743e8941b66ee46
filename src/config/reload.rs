//! What a configuration reload (SIGHUP) changes: the settings applied in place, and the
//! ones that take effect only at the next restart, each named for the log; and which
//! named entries (upstreams, mirror jobs) it adds, changes and removes. Pure: the daemon
//! applies the plan.

use super::Config;

/// The difference between the running configuration and a new, valid one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Changed settings that a reload applies at once.
    pub applied: Vec<&'static str>,
    /// Changed settings that need a restart (the running values stay until then).
    pub restart: Vec<&'static str>,
}

impl ReloadPlan {
    /// Compares every section of `old` and `new`.
    pub fn new(old: &Config, new: &Config) -> ReloadPlan {
        let mut plan = ReloadPlan::default();
        let differs =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let (o, n) = (&old.auth, &new.auth);
        for (name, changed, live) in [
            (
                "auth.issuer_keys",
                differs(&o.issuer_keys, &n.issuer_keys),
                true,
            ),
            ("auth.token_ttl", o.token_ttl != n.token_ttl, true),
            ("[[access]] rules", differs(&old.policy, &new.policy), true),
            (
                "auth.revocation_file",
                o.revocation_file != n.revocation_file,
                false,
            ),
            ("auth.central", o.central != n.central, false),
            ("auth.central_ttl", o.central_ttl != n.central_ttl, false),
            (
                "auth.offline_grace",
                o.offline_grace != n.offline_grace,
                false,
            ),
            (
                "auth.failure_limit",
                o.failure_limit != n.failure_limit,
                false,
            ),
            (
                "auth.failure_window",
                o.failure_window != n.failure_window,
                false,
            ),
            (
                "auth.token_secret_file",
                o.token_secret_file != n.token_secret_file,
                false,
            ),
            ("auth.service", o.service != n.service, false),
            ("[server]", differs(&old.server, &new.server), false),
            ("[storage]", differs(&old.storage, &new.storage), false),
            (
                "[[upstream]]",
                differs(&old.upstreams, &new.upstreams),
                true,
            ),
            ("[[mirror]]", differs(&old.mirrors, &new.mirrors), true),
        ] {
            if changed {
                if live {
                    plan.applied.push(name);
                } else {
                    plan.restart.push(name);
                }
            }
        }
        plan
    }
}

/// Named entries a reload adds, changes or removes, by name, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Changes {
    /// Compares `old` and `new` entries, matched by `name`; `same` tells unchanged ones.
    pub fn between<T>(
        old: &[T],
        new: &[T],
        name: impl Fn(&T) -> &str,
        same: impl Fn(&T, &T) -> bool,
    ) -> Changes {
        let find = |list: &'_ [T], wanted: &str| list.iter().position(|e| name(e) == wanted);
        let mut changes = Changes::default();
        for n in new {
            match find(old, name(n)) {
                None => changes.added.push(name(n).to_owned()),
                Some(i) if !same(&old[i], n) => changes.changed.push(name(n).to_owned()),
                Some(_) => {}
            }
        }
        for o in old {
            if find(new, name(o)).is_none() {
                changes.removed.push(name(o).to_owned());
            }
        }
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\n\
        [storage]\npath=\"x\"\n[[upstream]]\nname=\"docker.io\"\nurl=\"https://d\"\n";

    #[test]
    fn a_plan_names_what_a_reload_applies_and_what_waits_for_a_restart() {
        let old = Config::from_toml(BASE).expect("old");
        let new = Config::from_toml(&format!(
            "{}[auth]\nissuer_keys=[\"new.pub\"]\ntoken_ttl=\"10m\"\n\
             [[access]]\nrepositories=[\"docker.io/**\"]\nanonymous=[\"pull\"]\n",
            BASE.replace("https://d", "https://elsewhere")
        ))
        .expect("new");
        let plan = ReloadPlan::new(&old, &new);
        assert_eq!(
            plan.applied,
            vec![
                "auth.issuer_keys",
                "auth.token_ttl",
                "[[access]] rules",
                "[[upstream]]"
            ]
        );
        assert!(plan.restart.is_empty());
        let moved = Config::from_toml(
            &BASE.replace("listen=[\"127.0.0.1:0\"]", "listen=[\"127.0.0.1:1\"]"),
        )
        .expect("moved");
        assert_eq!(ReloadPlan::new(&old, &moved).restart, vec!["[server]"]);
        let mirrored = Config::from_toml(&format!(
            "{BASE}[[mirror]]\nname=\"apps\"\nupstream=\"docker.io\"\n\
             repositories=[\"team/app\"]\ntags=[\"v*\"]\n"
        ))
        .expect("mirrored");
        assert_eq!(
            ReloadPlan::new(&old, &mirrored),
            ReloadPlan {
                applied: vec!["[[mirror]]"],
                restart: Vec::new()
            }
        );
        assert_eq!(ReloadPlan::new(&old, &old), ReloadPlan::default());
    }

    #[test]
    fn changes_are_named_added_changed_and_removed() {
        let old = [("a", 1), ("b", 2), ("c", 3)];
        let new = [("b", 2), ("a", 9), ("d", 4)];
        let changes = Changes::between(&old, &new, |e| e.0, |x, y| x.1 == y.1);
        assert_eq!(
            changes,
            Changes {
                added: vec!["d".to_owned()],
                changed: vec!["a".to_owned()],
                removed: vec!["c".to_owned()],
            }
        );
        assert!(Changes::between(&old, &old, |e| e.0, |x, y| x.1 == y.1).is_empty());
    }
}
