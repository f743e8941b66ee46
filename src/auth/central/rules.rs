//! Locally cached central-registry logins, the pure part: how a presented password is
//! compared with the stored salted hash, and what a cached login or per-repository
//! decision is worth at a given time.
//!
//! Owns the rules, not the state: no I/O, no clock. Callers pass the stored confirmation
//! times and `now` (Unix seconds), so every rule is tested with injected time. The
//! coordinator that asks the central registry and keeps the records is the parent
//! module, `auth::central`.
//!
//! The rules, in one place:
//! - A login or a positive decision confirmed less than `ttl` ago is used as is.
//! - Past that, the central registry is asked again. If it cannot answer (unreachable,
//!   failing, rate-limiting), a positive record still holds until `offline_grace` after
//!   its last confirmation; then the caller is refused.
//! - Nothing is ever trusted longer than `offline_grace` without a confirmation, even when
//!   `ttl` is longer: the grace is the hard bound.
//! - A negative decision is remembered for `negative_ttl` (about 30 s), then asked again.
//! - Credentials that do not match the stored hash (or have none) always need the central
//!   registry; while it cannot answer they are refused.

use std::fmt;
use std::time::Duration;

use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Bytes of random salt per stored credential.
pub const SALT_LEN: usize = 16;

/// Bytes of a credential hash (HMAC-SHA256).
pub const HASH_LEN: usize = 32;

/// How long "no" from the central registry is remembered, by default.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// Domain separation for the credential hash.
const HASH_DOMAIN: &[u8] = b"outpost-central-credential-v2\0";

/// The time limits of cached central decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CentralRules {
    /// How long a positive answer is used before the central registry is asked again.
    pub ttl: Duration,
    /// How long a negative answer is used before the central registry is asked again.
    pub negative_ttl: Duration,
    /// How long a positive answer holds, since its last confirmation, while the central
    /// registry cannot answer.
    pub offline_grace: Duration,
}

impl CentralRules {
    /// Seconds a positive answer is used without asking: `ttl`, but never past the grace.
    fn fresh_secs(&self) -> u64 {
        self.ttl.min(self.offline_grace).as_secs()
    }
}

/// PBKDF2 rounds of a stored credential hash: enough that a stolen copy of the database
/// costs an attacker milliseconds per guess, paid here once per credential and process
/// (`CentralAuth` then remembers the match in memory under [`credential_key`]).
pub const CREDENTIAL_ROUNDS: u32 = 20_000;

/// The hash stored for a user's credential: PBKDF2-HMAC-SHA256 with a per-record random
/// salt over the user name and password. The password itself is never stored. Slow on
/// purpose: call it off the async executor.
pub fn credential_hash(salt: &[u8; SALT_LEN], user: &str, password: &str) -> [u8; HASH_LEN] {
    let input = Zeroizing::new(credential_input(user, password));
    let mut out = [0u8; HASH_LEN];
    // HMAC takes keys of any length, so this cannot fail; the fallback (a hash nothing
    // matches but itself) keeps the function total without a panic path.
    if pbkdf2::pbkdf2::<Hmac<Sha256>>(&input, salt, CREDENTIAL_ROUNDS, &mut out).is_err() {
        return [0; HASH_LEN];
    }
    out
}

/// Whether `user`/`password` is the credential a stored salt and hash were made from.
/// Constant time in the hash comparison. Slow, like [`credential_hash`].
pub fn credential_matches(
    salt: &[u8; SALT_LEN],
    hash: &[u8; HASH_LEN],
    user: &str,
    password: &str,
) -> bool {
    credential_hash(salt, user, password).ct_eq(hash).into()
}

/// A fast keyed digest of a credential (HMAC-SHA256 under `key`), for in-memory maps
/// keyed by a process-random key. Never stored: it would be cheap to brute-force.
pub fn credential_key(key: &[u8; SALT_LEN], user: &str, password: &str) -> [u8; HASH_LEN] {
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        return [0; HASH_LEN];
    };
    mac.update(&credential_input(user, password));
    mac.finalize().into_bytes().into()
}

/// What the hashes cover: a domain tag, then the user name length-prefixed so that
/// ("a:b", "c") and ("a", "b:c") never collide, then the password.
fn credential_input(user: &str, password: &str) -> Vec<u8> {
    let mut input = Vec::with_capacity(HASH_DOMAIN.len() + 8 + user.len() + password.len());
    input.extend_from_slice(HASH_DOMAIN);
    input.extend_from_slice(&(user.len() as u64).to_le_bytes());
    input.extend_from_slice(user.as_bytes());
    input.extend_from_slice(password.as_bytes());
    input
}

/// A fresh random salt.
pub fn new_salt() -> Result<[u8; SALT_LEN], getrandom::Error> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt)?;
    Ok(salt)
}

/// What to do with presented credentials, given what is stored for the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginStep {
    /// They match a login confirmed recently enough: accept without asking.
    Accept,
    /// They match, but the confirmation is due: ask the central registry. If it cannot
    /// answer, `offline_ok` says whether the stored login still holds (grace).
    Revalidate { offline_ok: bool },
    /// Unknown (or different) credentials: only the central registry can accept them.
    Verify,
}

/// Judges presented credentials. `stored` is the last online confirmation time of the
/// stored credential when the presented one matches it, `None` when nothing matches.
pub fn judge_login(stored: Option<u64>, now: u64, rules: &CentralRules) -> LoginStep {
    let Some(verified_at) = stored else {
        return LoginStep::Verify;
    };
    if now < verified_at.saturating_add(rules.fresh_secs()) {
        LoginStep::Accept
    } else {
        LoginStep::Revalidate {
            offline_ok: within_grace(verified_at, now, rules),
        }
    }
}

/// A per-repository answer of the central registry, as remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Unix seconds of the central registry's last answer.
    pub confirmed_at: u64,
}

/// What to do about a pull, given the remembered decision for this user and repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoStep {
    /// The remembered answer is recent enough: use it.
    Known(bool),
    /// Ask the central registry. If it cannot answer, `offline` is what to do instead.
    Ask { offline: Offline },
}

/// The answer when the central registry cannot be asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offline {
    /// A positive answer within its grace: allow.
    Allow,
    /// A positive answer past its grace: refuse.
    Expired,
    /// Nothing positive known: refuse.
    Unknown,
}

/// Judges a pull from the remembered decision (if any).
pub fn judge_repo(decision: Option<Decision>, now: u64, rules: &CentralRules) -> RepoStep {
    let Some(d) = decision else {
        return RepoStep::Ask {
            offline: Offline::Unknown,
        };
    };
    if d.allowed {
        if now < d.confirmed_at.saturating_add(rules.fresh_secs()) {
            return RepoStep::Known(true);
        }
        let offline = if within_grace(d.confirmed_at, now, rules) {
            Offline::Allow
        } else {
            Offline::Expired
        };
        return RepoStep::Ask { offline };
    }
    if now < d.confirmed_at.saturating_add(rules.negative_ttl.as_secs()) {
        RepoStep::Known(false)
    } else {
        RepoStep::Ask {
            offline: Offline::Unknown,
        }
    }
}

/// Whether a remembered positive decision may be used without asking at all, as for a
/// token holder (tokens are checked against the cache, never online): positive and
/// within the grace of its last confirmation.
pub fn cached_allows(decision: Option<Decision>, now: u64, rules: &CentralRules) -> bool {
    decision.is_some_and(|d| d.allowed && within_grace(d.confirmed_at, now, rules))
}

fn within_grace(confirmed_at: u64, now: u64, rules: &CentralRules) -> bool {
    now < confirmed_at.saturating_add(rules.offline_grace.as_secs())
}

/// A user name and password presented for a central-registry user, before any check.
/// `Debug` never shows the password.
#[derive(Clone)]
pub struct CentralLogin {
    pub user: String,
    pub password: crate::auth::Secret,
}

impl fmt::Debug for CentralLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CentralLogin")
            .field("user", &self.user)
            .field("password", &self.password)
            .finish()
    }
}

/// A central-registry user whose credentials checked out (online, or against the cache).
/// The password is kept for the request's own repository checks at the central registry,
/// and never shown.
#[derive(Clone, Debug)]
pub struct CentralUser {
    pub name: String,
    pub password: crate::auth::Secret,
}

/// Longest central user name accepted.
pub const MAX_USER_LEN: usize = 256;

/// Whether `user` can be a central user name: not empty (the empty name keys anonymous
/// decisions), bounded, no control characters.
pub fn valid_user_name(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_LEN && !user.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: CentralRules = CentralRules {
        ttl: Duration::from_secs(300),
        negative_ttl: Duration::from_secs(30),
        offline_grace: Duration::from_secs(7 * 86400),
    };
    const T: u64 = 1_800_000_000;
    const DAY: u64 = 86400;

    #[test]
    fn hash_is_salted_and_matches_only_its_credential() {
        let salt = [7u8; SALT_LEN];
        let hash = credential_hash(&salt, "alice", "hunter2");
        assert!(credential_matches(&salt, &hash, "alice", "hunter2"));
        assert!(!credential_matches(&salt, &hash, "alice", "hunter3"));
        assert!(!credential_matches(&salt, &hash, "bob", "hunter2"));
        assert_ne!(hash, credential_hash(&[8u8; SALT_LEN], "alice", "hunter2"));
        // The user/password split is part of what is hashed.
        assert_ne!(
            credential_hash(&salt, "a:b", "c"),
            credential_hash(&salt, "a", "b:c")
        );
        let salt2 = new_salt().expect("entropy");
        assert_ne!(salt2, new_salt().expect("entropy"));
    }

    #[test]
    fn login_fresh_then_revalidate_then_expired() {
        assert_eq!(judge_login(None, T, &RULES), LoginStep::Verify);
        assert_eq!(judge_login(Some(T), T, &RULES), LoginStep::Accept);
        assert_eq!(judge_login(Some(T), T + 299, &RULES), LoginStep::Accept);
        assert_eq!(
            judge_login(Some(T), T + 300, &RULES),
            LoginStep::Revalidate { offline_ok: true }
        );
        assert_eq!(
            judge_login(Some(T), T + 7 * DAY - 1, &RULES),
            LoginStep::Revalidate { offline_ok: true }
        );
        assert_eq!(
            judge_login(Some(T), T + 7 * DAY, &RULES),
            LoginStep::Revalidate { offline_ok: false }
        );
    }

    #[test]
    fn positive_decision_fresh_stale_in_grace_and_expired() {
        let yes = Some(Decision {
            allowed: true,
            confirmed_at: T,
        });
        assert_eq!(judge_repo(yes, T + 10, &RULES), RepoStep::Known(true));
        assert_eq!(
            judge_repo(yes, T + 300, &RULES),
            RepoStep::Ask {
                offline: Offline::Allow
            }
        );
        assert_eq!(
            judge_repo(yes, T + 7 * DAY - 1, &RULES),
            RepoStep::Ask {
                offline: Offline::Allow
            }
        );
        assert_eq!(
            judge_repo(yes, T + 7 * DAY, &RULES),
            RepoStep::Ask {
                offline: Offline::Expired
            }
        );
        assert!(cached_allows(yes, T + 7 * DAY - 1, &RULES));
        assert!(!cached_allows(yes, T + 7 * DAY, &RULES));
    }

    #[test]
    fn negative_decision_is_remembered_briefly() {
        let no = Some(Decision {
            allowed: false,
            confirmed_at: T,
        });
        assert_eq!(judge_repo(no, T, &RULES), RepoStep::Known(false));
        assert_eq!(judge_repo(no, T + 29, &RULES), RepoStep::Known(false));
        assert_eq!(
            judge_repo(no, T + 30, &RULES),
            RepoStep::Ask {
                offline: Offline::Unknown
            }
        );
        assert!(!cached_allows(no, T, &RULES));
        assert_eq!(
            judge_repo(None, T, &RULES),
            RepoStep::Ask {
                offline: Offline::Unknown
            }
        );
        assert!(!cached_allows(None, T, &RULES));
    }

    #[test]
    fn grace_bounds_the_ttl() {
        let short = CentralRules {
            ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            offline_grace: Duration::from_secs(3),
        };
        let yes = Some(Decision {
            allowed: true,
            confirmed_at: T,
        });
        assert_eq!(judge_repo(yes, T + 2, &short), RepoStep::Known(true));
        assert_eq!(
            judge_repo(yes, T + 3, &short),
            RepoStep::Ask {
                offline: Offline::Expired
            }
        );
        assert_eq!(
            judge_login(Some(T), T + 3, &short),
            LoginStep::Revalidate { offline_ok: false }
        );
    }

    #[test]
    fn clock_going_backwards_keeps_answers_fresh_not_panicking() {
        let yes = Some(Decision {
            allowed: true,
            confirmed_at: T,
        });
        assert_eq!(judge_repo(yes, T - 100, &RULES), RepoStep::Known(true));
        assert_eq!(judge_login(Some(u64::MAX), T, &RULES), LoginStep::Accept);
    }

    #[test]
    fn user_names() {
        assert!(valid_user_name("alice"));
        assert!(valid_user_name("alice@corp.example"));
        assert!(!valid_user_name(""));
        assert!(!valid_user_name("a\nb"));
        assert!(!valid_user_name(&"a".repeat(MAX_USER_LEN + 1)));
    }

    #[test]
    fn debug_hides_the_password() {
        let login = CentralLogin {
            user: "alice".into(),
            password: crate::auth::Secret::new("hunter2-secret"),
        };
        let user = CentralUser {
            name: "alice".into(),
            password: crate::auth::Secret::new("hunter2-secret"),
        };
        let shown = format!("{login:?} {user:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
    }
}
