//! What a configuration reload (SIGHUP) changes: the settings applied in place, and the
//! ones that take effect only at the next restart, each named for the log. Pure: the
//! daemon applies the plan.

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
            ("[[mirror]]", differs(&old.mirrors, &new.mirrors), false),
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
        assert_eq!(ReloadPlan::new(&old, &old), ReloadPlan::default());
    }
}
