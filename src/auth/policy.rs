//! The access policy: which actions anonymous callers, any authenticated caller and named
//! users may take on which repositories, and which tags are immutable.
//!
//! Owns the pure decision function. Rules are tried in order and the first whose
//! repository globs match decides, even if it grants nothing. The policy never grants
//! `push` or `delete`: those come only from a signed API key's own scope, so a rule that
//! tries is refused when the policy is built.

use std::collections::BTreeMap;

use globset::{Glob, GlobMatcher};

use super::glob::RepoGlobs;
use super::{Action, Actions};
use crate::oci::{RepoName, Tag};

/// One `[[access]]` entry, as plain data; the config module builds these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessRule {
    pub repositories: Vec<String>,
    pub anonymous: Actions,
    pub authenticated: Actions,
    pub users: BTreeMap<String, Actions>,
    pub immutable_tags: Vec<String>,
}

/// A rule the policy refuses. `rule` is the 1-based position in the list, as an operator
/// counts `[[access]]` entries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("access rule {rule}: `repositories` is empty")]
    NoRepositories { rule: usize },
    #[error("access rule {rule}: {error}")]
    BadRepositoryGlob {
        rule: usize,
        error: super::glob::GlobError,
    },
    #[error("access rule {rule}: invalid immutable tag pattern {pattern:?}: {reason}")]
    BadTagPattern {
        rule: usize,
        pattern: String,
        reason: String,
    },
    #[error(
        "access rule {rule} never applies: rule {by} comes first and matches every repository \
         it names (the first matching rule decides); merge them or reorder"
    )]
    Unreachable { rule: usize, by: usize },
    #[error("access rule {rule}: a user name is empty")]
    EmptyUserName { rule: usize },
    #[error(
        "access rule {rule}: {who} may not be granted {actions}; only signed API keys push or delete"
    )]
    WriteGranted {
        rule: usize,
        who: String,
        actions: Actions,
    },
}

/// Who is asking, as far as the policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity<'a> {
    Anonymous,
    /// Any verified caller; `user` names a central-registry user, matched against `users`.
    Authenticated {
        user: Option<&'a str>,
    },
}

#[derive(Clone, Debug)]
struct Rule {
    repositories: RepoGlobs,
    anonymous: Actions,
    authenticated: Actions,
    users: BTreeMap<String, Actions>,
    immutable_tags: Vec<GlobMatcher>,
}

/// A validated, compiled list of access rules.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// Rules that can never match because an earlier rule covers every glob they name: the
/// same glob, `**`, or a literal `prefix/**` above it. (Only these plain cases; globs are
/// not compared in general.) Such a list is valid for [`Policy::new`], whose decisions
/// stay well defined, but almost certainly not what the operator meant: configuration
/// validation refuses it.
pub fn unreachable_rules(rules: &[AccessRule]) -> Vec<PolicyError> {
    let covers = |earlier: &str, glob: &str| {
        earlier == glob
            || earlier == "**"
            || earlier.strip_suffix("/**").is_some_and(|prefix| {
                !prefix.contains(['*', '?', '[', '{', '\\'])
                    && glob
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('/'))
            })
    };
    let mut errors = Vec::new();
    for (j, rule) in rules.iter().enumerate() {
        if rule.repositories.is_empty() {
            continue;
        }
        let by = rules[..j].iter().position(|earlier| {
            rule.repositories
                .iter()
                .all(|g| earlier.repositories.iter().any(|e| covers(e, g)))
        });
        if let Some(i) = by {
            errors.push(PolicyError::Unreachable {
                rule: j + 1,
                by: i + 1,
            });
        }
    }
    errors
}

/// Actions only an API key's own scope may grant.
fn write_actions() -> Actions {
    Actions::NONE.with(Action::Push).with(Action::Delete)
}

impl Policy {
    /// Compiles the rules, reporting every problem of every rule at once.
    pub fn new(rules: Vec<AccessRule>) -> Result<Policy, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, rule) in rules.into_iter().enumerate() {
            if let Some(r) = compile_rule(i + 1, rule, &mut errors) {
                compiled.push(r);
            }
        }
        if errors.is_empty() {
            Ok(Policy { rules: compiled })
        } else {
            Err(errors)
        }
    }

    /// No rules: nobody may do anything the policy grants (API keys still grant their scope).
    pub fn default_deny() -> Policy {
        Policy::default()
    }

    /// What `who` may do on `repo`. Never contains `push` or `delete`.
    pub fn grants(&self, who: Identity<'_>, repo: &RepoName) -> Actions {
        let Some(rule) = self.matching_rule(repo) else {
            return Actions::NONE;
        };
        let rule = &self.rules[rule];
        match who {
            Identity::Anonymous => rule.anonymous,
            Identity::Authenticated { user } => {
                let named = user
                    .and_then(|u| rule.users.get(u))
                    .copied()
                    .unwrap_or(Actions::NONE);
                rule.anonymous.union(rule.authenticated).union(named)
            }
        }
    }

    /// If `tag` in `repo` may only be pushed once, a description of the rule that says so,
    /// for the `DENIED` message.
    pub fn immutable_rule(&self, repo: &RepoName, tag: &Tag) -> Option<String> {
        let index = self.matching_rule(repo)?;
        self.rules[index]
            .immutable_tags
            .iter()
            .find(|m| m.is_match(tag.as_str()))
            .map(|m| {
                format!(
                    "immutable_tags {:?} of access rule {}",
                    m.glob().glob(),
                    index + 1
                )
            })
    }

    /// Index of the first rule whose repository globs match: the rule that decides.
    fn matching_rule(&self, repo: &RepoName) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.repositories.is_match(repo))
    }
}

fn compile_rule(number: usize, rule: AccessRule, errors: &mut Vec<PolicyError>) -> Option<Rule> {
    let before = errors.len();
    if rule.repositories.is_empty() {
        errors.push(PolicyError::NoRepositories { rule: number });
    }
    let repositories = RepoGlobs::compile(&rule.repositories)
        .map_err(|errs| {
            errors.extend(
                errs.into_iter()
                    .map(|error| PolicyError::BadRepositoryGlob {
                        rule: number,
                        error,
                    }),
            );
        })
        .ok();

    let mut refuse_writes = |who: String, granted: Actions| {
        let writes = granted.intersect(write_actions());
        if !writes.is_empty() {
            errors.push(PolicyError::WriteGranted {
                rule: number,
                who,
                actions: writes,
            });
        }
    };
    refuse_writes("anonymous".to_owned(), rule.anonymous);
    refuse_writes("authenticated".to_owned(), rule.authenticated);
    for (user, granted) in &rule.users {
        refuse_writes(format!("user {user:?}"), *granted);
    }
    if rule.users.keys().any(|u| u.trim().is_empty()) {
        errors.push(PolicyError::EmptyUserName { rule: number });
    }

    let mut immutable_tags = Vec::with_capacity(rule.immutable_tags.len());
    for pattern in &rule.immutable_tags {
        match Glob::new(pattern) {
            Ok(g) if !pattern.trim().is_empty() => immutable_tags.push(g.compile_matcher()),
            Ok(_) => errors.push(PolicyError::BadTagPattern {
                rule: number,
                pattern: pattern.clone(),
                reason: "pattern is empty".to_owned(),
            }),
            Err(e) => errors.push(PolicyError::BadTagPattern {
                rule: number,
                pattern: pattern.clone(),
                reason: e.kind().to_string(),
            }),
        }
    }

    if errors.len() > before {
        return None;
    }
    Some(Rule {
        repositories: repositories?,
        anonymous: rule.anonymous,
        authenticated: rule.authenticated,
        users: rule.users,
        immutable_tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(name: &str) -> RepoName {
        name.parse().expect("valid name")
    }

    fn acts(s: &str) -> Actions {
        Actions::parse_list(s).expect("valid actions")
    }

    fn rule(repos: &[&str], anonymous: &str, authenticated: &str) -> AccessRule {
        AccessRule {
            repositories: repos.iter().map(|r| (*r).to_owned()).collect(),
            anonymous: acts(anonymous),
            authenticated: acts(authenticated),
            ..AccessRule::default()
        }
    }

    const ALICE: Identity<'static> = Identity::Authenticated {
        user: Some("alice"),
    };
    const SOMEONE: Identity<'static> = Identity::Authenticated { user: None };

    #[test]
    fn rules_shadowed_by_earlier_ones_are_reported() {
        let rules = vec![
            rule(&["docker.io/**"], "pull", ""),
            rule(&["team/*"], "", "pull"),
            rule(&["docker.io/library/*", "docker.io/x"], "", "pull"),
            rule(&["team/*"], "pull", ""),
            rule(&["team/app", "other/**"], "", "pull"),
            rule(&["**"], "", ""),
            rule(&["anything/at/all"], "pull", ""),
        ];
        assert_eq!(
            unreachable_rules(&rules),
            vec![
                PolicyError::Unreachable { rule: 3, by: 1 },
                PolicyError::Unreachable { rule: 4, by: 2 },
                PolicyError::Unreachable { rule: 7, by: 6 },
            ]
        );
        // A literal prefix only covers names below it, and glob prefixes are not compared.
        let rules = vec![
            rule(&["team/**"], "", "pull"),
            rule(&["teamx/app"], "pull", ""),
            rule(&["t*/**"], "", "pull"),
            rule(&["tx/app"], "pull", ""),
        ];
        assert!(unreachable_rules(&rules).is_empty());
    }

    #[test]
    fn product_default_shape() {
        let mut team = rule(&["central.corp/team/**"], "", "pull");
        team.users.insert("alice".to_owned(), acts("pull"));
        team.immutable_tags = vec!["v*".to_owned()];
        let policy = Policy::new(vec![
            rule(&["docker.io/**", "ghcr.io/**", "quay.io/**"], "pull", ""),
            team,
        ])
        .expect("valid");

        let alpine = repo("docker.io/library/alpine");
        assert_eq!(policy.grants(Identity::Anonymous, &alpine), Actions::PULL);
        assert_eq!(policy.grants(SOMEONE, &alpine), Actions::PULL);

        let app = repo("central.corp/team/app");
        assert_eq!(policy.grants(Identity::Anonymous, &app), Actions::NONE);
        assert_eq!(policy.grants(SOMEONE, &app), Actions::PULL);
        assert_eq!(policy.grants(ALICE, &app), Actions::PULL);

        assert_eq!(policy.grants(SOMEONE, &repo("elsewhere/x")), Actions::NONE);
    }

    #[test]
    fn first_matching_rule_wins_even_when_it_grants_nothing() {
        let policy = Policy::new(vec![
            rule(&["team/secret"], "", ""),
            rule(&["team/*"], "pull", "pull"),
        ])
        .expect("valid");
        assert_eq!(policy.grants(SOMEONE, &repo("team/secret")), Actions::NONE);
        assert_eq!(policy.grants(SOMEONE, &repo("team/open")), Actions::PULL);
    }

    #[test]
    fn named_users_only_get_their_own_entry() {
        let mut r = rule(&["team/**"], "", "");
        r.users.insert("alice".to_owned(), acts("pull"));
        let policy = Policy::new(vec![r]).expect("valid");
        let app = repo("team/app");
        assert_eq!(policy.grants(ALICE, &app), Actions::PULL);
        let bob = Identity::Authenticated { user: Some("bob") };
        assert_eq!(policy.grants(bob, &app), Actions::NONE);
        assert_eq!(policy.grants(SOMEONE, &app), Actions::NONE);
    }

    #[test]
    fn default_deny_grants_nothing() {
        let policy = Policy::default_deny();
        assert_eq!(policy.grants(ALICE, &repo("a")), Actions::NONE);
        assert_eq!(
            policy.immutable_rule(&repo("a"), &"v1".parse().expect("tag")),
            None
        );
    }

    #[test]
    fn refuses_write_grants_and_reports_every_problem() {
        let mut users = BTreeMap::new();
        users.insert("alice".to_owned(), acts("pull,delete"));
        users.insert(String::new(), acts("pull"));
        let errors = Policy::new(vec![
            rule(&["ok/**"], "pull", "pull"),
            rule(&["a/**"], "push", "pull,delete"),
            AccessRule {
                repositories: vec![],
                users,
                immutable_tags: vec!["[".to_owned()],
                ..AccessRule::default()
            },
            rule(&["b/[", "c/{"], "", ""),
        ])
        .expect_err("invalid");
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 8, "{shown:#?}");
        assert!(shown.iter().all(|s| !s.starts_with("access rule 1:")));
        assert!(shown.contains(
            &"access rule 2: anonymous may not be granted push; only signed API keys push or delete"
                .to_owned()
        ));
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("access rule 2: authenticated"))
        );
        assert!(shown.contains(&"access rule 3: `repositories` is empty".to_owned()));
        assert!(
            shown
                .iter()
                .any(|s| s.contains("user \"alice\" may not be granted delete"))
        );
        assert!(
            shown
                .iter()
                .any(|s| s.contains("access rule 3: a user name is empty"))
        );
        assert!(
            shown
                .iter()
                .any(|s| s.contains("immutable tag pattern \"[\""))
        );
        assert_eq!(
            shown
                .iter()
                .filter(|s| s.starts_with("access rule 4:"))
                .count(),
            2
        );
    }

    #[test]
    fn immutable_rule_names_the_pattern_and_rule() {
        let mut team = rule(&["team/**"], "", "pull");
        team.immutable_tags = vec!["release-*".to_owned(), "v*".to_owned()];
        let policy = Policy::new(vec![rule(&["team/scratch"], "", "pull"), team]).expect("valid");
        let tag = |t: &str| -> Tag { t.parse().expect("tag") };
        assert_eq!(
            policy.immutable_rule(&repo("team/app"), &tag("v1.2")),
            Some("immutable_tags \"v*\" of access rule 2".to_owned())
        );
        assert_eq!(
            policy.immutable_rule(&repo("team/app"), &tag("latest")),
            None
        );
        // The first matching rule decides immutability too.
        assert_eq!(
            policy.immutable_rule(&repo("team/scratch"), &tag("v1")),
            None
        );
        assert_eq!(policy.immutable_rule(&repo("other/app"), &tag("v1")), None);
    }

    /// Property tests over random policies and names, driven by a deterministic xorshift
    /// generator so failures reproduce from the printed seed.
    mod properties {
        use super::*;

        struct XorShift(u64);

        impl XorShift {
            /// Spreads small seeds over the state space (xorshift starts slowly from 1, 2, ...).
            fn seeded(seed: u64) -> XorShift {
                XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
            }

            fn next(&mut self) -> u64 {
                let mut x = self.0;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.0 = x;
                x
            }

            fn below(&mut self, n: usize) -> usize {
                (self.next() % n as u64) as usize
            }

            fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
                items[self.below(items.len())]
            }

            /// With `allow_writes`, about one set in eight asks for `push` or `delete`, so
            /// that both valid and refused policies come up often.
            fn actions(&mut self, allow_writes: bool) -> Actions {
                let bits = self.next();
                let mut a = Actions::NONE;
                if bits & 1 != 0 {
                    a = a.with(Action::Pull);
                }
                if allow_writes && (bits >> 8) % 8 == 0 {
                    a = a.with(if bits & 2 != 0 {
                        Action::Push
                    } else {
                        Action::Delete
                    });
                }
                a
            }

            fn glob(&mut self) -> String {
                let depth = 1 + self.below(3);
                (0..depth)
                    .map(|_| self.pick(&["a", "b", "*", "**"]))
                    .collect::<Vec<_>>()
                    .join("/")
            }

            fn name(&mut self) -> RepoName {
                let depth = 1 + self.below(4);
                (0..depth)
                    .map(|_| self.pick(&["a", "b", "c"]))
                    .collect::<Vec<_>>()
                    .join("/")
                    .parse()
                    .expect("valid name")
            }

            fn rule(&mut self, allow_writes: bool) -> AccessRule {
                let mut users = BTreeMap::new();
                for user in ["alice", "bob"] {
                    if self.next() & 1 != 0 {
                        users.insert(user.to_owned(), self.actions(allow_writes));
                    }
                }
                AccessRule {
                    repositories: (0..1 + self.below(2)).map(|_| self.glob()).collect(),
                    anonymous: self.actions(allow_writes),
                    authenticated: self.actions(allow_writes),
                    users,
                    immutable_tags: vec![],
                }
            }

            fn rules(&mut self, allow_writes: bool) -> Vec<AccessRule> {
                (0..1 + self.below(5))
                    .map(|_| self.rule(allow_writes))
                    .collect()
            }
        }

        /// An independent model of repository glob semantics over whole components: `*` is
        /// one component, `**` is zero or more (one or more when last, since the `/` before
        /// it must be matched).
        fn model_match(pattern: &[&str], name: &[&str]) -> bool {
            match (pattern.split_first(), name.split_first()) {
                (None, None) => true,
                (None, Some(_)) => false,
                (Some((&"**", [])), _) => !name.is_empty(),
                (Some((&"**", rest)), _) => {
                    (0..=name.len()).any(|skip| model_match(rest, &name[skip..]))
                }
                (Some(_), None) => false,
                (Some((&"*", rest)), Some((_, name_rest))) => model_match(rest, name_rest),
                (Some((lit, rest)), Some((n, name_rest))) => {
                    lit == n && model_match(rest, name_rest)
                }
            }
        }

        fn model_rule(rules: &[AccessRule], name: &RepoName) -> Option<usize> {
            let parts: Vec<&str> = name.as_str().split('/').collect();
            rules.iter().position(|r| {
                r.repositories.iter().any(|g| {
                    let pattern: Vec<&str> = g.split('/').collect();
                    model_match(&pattern, &parts)
                })
            })
        }

        const CASES: u64 = 500;
        const NAMES_PER_CASE: usize = 20;

        fn identities() -> [Identity<'static>; 4] {
            [
                Identity::Anonymous,
                Identity::Authenticated { user: None },
                Identity::Authenticated {
                    user: Some("alice"),
                },
                Identity::Authenticated { user: Some("bob") },
            ]
        }

        #[test]
        fn writes_are_refused_and_never_granted() {
            let (mut accepted, mut refused) = (0, 0);
            for seed in 1..=CASES {
                let mut rng = XorShift::seeded(seed);
                let rules = rng.rules(true);
                let grants_writes = rules.iter().any(|r| {
                    r.anonymous
                        .union(r.authenticated)
                        .union(r.users.values().fold(Actions::NONE, |a, b| a.union(*b)))
                        .intersect(write_actions())
                        != Actions::NONE
                });
                match Policy::new(rules) {
                    Ok(policy) => {
                        accepted += 1;
                        assert!(!grants_writes, "seed {seed}: write grant accepted");
                        for _ in 0..NAMES_PER_CASE {
                            let name = rng.name();
                            for who in identities() {
                                let g = policy.grants(who, &name);
                                assert!(
                                    g.intersect(write_actions()).is_empty(),
                                    "seed {seed}: {who:?} got {g} on {name}"
                                );
                            }
                        }
                    }
                    Err(_) => {
                        refused += 1;
                        assert!(grants_writes, "seed {seed}: valid rules refused");
                    }
                }
            }
            assert!(
                accepted > CASES / 10 && refused > CASES / 10,
                "{accepted}/{refused}"
            );
        }

        #[test]
        fn anonymous_grants_are_a_subset_of_authenticated_grants() {
            for seed in 1..=CASES {
                let mut rng = XorShift::seeded(seed);
                let policy = Policy::new(rng.rules(false)).expect("pull-only rules are valid");
                for _ in 0..NAMES_PER_CASE {
                    let name = rng.name();
                    let anonymous = policy.grants(Identity::Anonymous, &name);
                    for who in identities() {
                        let g = policy.grants(who, &name);
                        assert_eq!(g.union(anonymous), g, "seed {seed}: {who:?} on {name}");
                    }
                }
            }
        }

        #[test]
        fn first_match_decides_and_globs_follow_the_model() {
            let mut matched = 0;
            for seed in 1..=CASES {
                let mut rng = XorShift::seeded(seed);
                let rules = rng.rules(false);
                let policy = Policy::new(rules.clone()).expect("valid");
                for _ in 0..NAMES_PER_CASE {
                    let name = rng.name();
                    let expected = model_rule(&rules, &name);
                    matched += usize::from(expected.is_some());
                    assert_eq!(
                        policy.matching_rule(&name),
                        expected,
                        "seed {seed}: {name} against {rules:?}"
                    );
                    for who in identities() {
                        let want = match expected {
                            None => Actions::NONE,
                            Some(i) => Policy::new(vec![rules[i].clone()])
                                .expect("valid")
                                .grants(who, &name),
                        };
                        assert_eq!(policy.grants(who, &name), want, "seed {seed}: {name}");
                    }
                }
            }
            // Both outcomes must be common, or the property says little.
            let total = CASES as usize * NAMES_PER_CASE;
            assert!(
                matched > total / 5 && matched < total * 4 / 5,
                "{matched}/{total}"
            );
        }

        #[test]
        fn appending_a_rule_never_changes_earlier_decisions() {
            for seed in 1..=CASES {
                let mut rng = XorShift::seeded(seed);
                let rules = rng.rules(false);
                let before = Policy::new(rules.clone()).expect("valid");
                let mut extended = rules;
                extended.push(rng.rule(false));
                let after = Policy::new(extended).expect("valid");
                for _ in 0..NAMES_PER_CASE {
                    let name = rng.name();
                    if before.matching_rule(&name).is_none() {
                        continue;
                    }
                    for who in identities() {
                        assert_eq!(
                            before.grants(who, &name),
                            after.grants(who, &name),
                            "seed {seed}: {name}"
                        );
                    }
                }
            }
        }
    }
}
