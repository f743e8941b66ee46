//! Upstream token auth (the Docker registry token spec): what an upstream asked for, the
//! token fetch from its realm, and the per-scope token cache.
//!
//! Tokens and passwords stay in [`Secret`]; nothing here logs them or puts them in an
//! error. Concurrent requests for the same scope share one token fetch (the slot's lock is
//! held across it); later requests reuse the token until shortly before it expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::time::Instant;

use super::{Inner, UpstreamError, lock};
use crate::auth::Secret;

/// `expires_in` when the token response has none (the spec's default; GHCR omits it).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);

/// Longest lifetime believed, whatever the realm claims.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Largest token response read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 1024 * 1024;

/// Past this many scopes, expired and idle entries are dropped from the cache.
const MAX_CACHED_SCOPES: usize = 1024;

/// How an upstream wants to be authenticated, learned from its last challenge so that
/// requests for new scopes can authenticate up front instead of paying a 401 first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuthHint {
    #[default]
    Unknown,
    Bearer(BearerRealm),
    Basic,
}

/// Where tokens come from: a Bearer challenge's `realm` and `service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerRealm {
    pub realm: String,
    pub service: Option<String>,
}

impl BearerRealm {
    /// The realm of the first usable Bearer challenge among `challenges`.
    pub fn from_challenges(challenges: &[super::challenge::Challenge]) -> Option<BearerRealm> {
        challenges
            .iter()
            .filter(|c| c.scheme == "bearer")
            .find_map(|c| {
                Some(BearerRealm {
                    realm: c.param("realm").filter(|r| !r.is_empty())?.to_owned(),
                    service: c.param("service").map(str::to_owned),
                })
            })
    }
}

/// A token as granted by the realm.
#[derive(Debug)]
pub struct Grant {
    pub token: Secret,
    pub expires_in: Duration,
}

/// A token handed out by the cache; `fetched` when this very call fetched it (so a 401
/// answered to it will not be cured by fetching again).
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: Secret,
    pub fetched: bool,
}

struct Cached {
    token: Secret,
    fresh_until: Instant,
}

type Slot = tokio::sync::Mutex<Option<Cached>>;

/// Tokens per scope (`repository:<repo>:pull`).
#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl TokenCache {
    /// The cached token for `scope`, or one from `fetch`. A cached token equal to
    /// `reject` (the upstream just refused it) is not reused.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        scope: &str,
        reject: Option<&Secret>,
        fetch: F,
    ) -> Result<Issued, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Grant, UpstreamError>>,
    {
        let slot = self.slot(scope);
        // Held across the fetch: concurrent callers for this scope wait for its result.
        let mut cached = slot.lock().await;
        let now = Instant::now();
        if let Some(c) = cached.as_ref()
            && now < c.fresh_until
            && !reject.is_some_and(|r| c.token.ct_eq(r.expose()))
        {
            return Ok(Issued {
                token: c.token.clone(),
                fetched: false,
            });
        }
        // Timed from before the request: the realm's clock starts no earlier.
        let grant = fetch().await?;
        *cached = Some(Cached {
            token: grant.token.clone(),
            fresh_until: now + fresh_for(grant.expires_in),
        });
        Ok(Issued {
            token: grant.token,
            fetched: true,
        })
    }

    fn slot(&self, scope: &str) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get(scope) {
            return s.clone();
        }
        if slots.len() >= MAX_CACHED_SCOPES {
            let now = Instant::now();
            // Keep slots in use (a fetch or a waiter holds a clone) and fresh tokens.
            slots.retain(|_, s| {
                Arc::strong_count(s) > 1
                    || s.try_lock()
                        .is_ok_and(|c| c.as_ref().is_some_and(|c| now < c.fresh_until))
            });
            if slots.len() >= MAX_CACHED_SCOPES {
                slots.retain(|_, s| Arc::strong_count(s) > 1);
            }
        }
        let s = Arc::new(Slot::default());
        slots.insert(scope.to_owned(), s.clone());
        s
    }
}

/// How long a token is reused: its lifetime minus a margin (10 %, at most 30 s) so that
/// it is not presented just as it expires.
fn fresh_for(ttl: Duration) -> Duration {
    ttl - (ttl / 10).min(Duration::from_secs(30))
}

/// The realm's URL, if credentials may be sent to it: https, or http when the registry
/// itself is plain http.
pub fn realm_url(realm: &BearerRealm, upstream_is_https: bool) -> Result<Url, String> {
    let url = Url::parse(&realm.realm).map_err(|e| format!("token realm is not a URL ({e})"))?;
    match url.scheme() {
        "https" => Ok(url),
        // Credentials must not go in clear text to a realm when the registry is on TLS.
        "http" if !upstream_is_https => Ok(url),
        other => Err(format!("token realm has scheme {other:?}, not https")),
    }
}

/// The token request URL: the realm with `service` and `scope` added to its query.
pub fn token_url(realm: &BearerRealm, scope: &str, upstream_is_https: bool) -> Result<Url, String> {
    let mut url = realm_url(realm, upstream_is_https)?;
    {
        let mut q = url.query_pairs_mut();
        if let Some(service) = realm.service.as_deref().filter(|s| !s.is_empty()) {
            q.append_pair("service", service);
        }
        q.append_pair("scope", scope);
    }
    Ok(url)
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
}

/// Parses a token response body: `token` (or OAuth2's `access_token`) and `expires_in`.
pub fn parse_token_response(body: &[u8]) -> Result<Grant, String> {
    // serde's message is not used: it could quote a piece of the body.
    let raw: TokenResponse = serde_json::from_slice(body).map_err(|e| {
        format!(
            "token response is not the expected JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    let token = raw
        .token
        .filter(|t| !t.is_empty())
        .or(raw.access_token.filter(|t| !t.is_empty()))
        .ok_or("token response has no token")?;
    // It goes into an Authorization header: visible ASCII only.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("token response holds a token that is not a header value".into());
    }
    let seconds = match raw.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    let expires_in = match seconds {
        Some(s) if s >= 1.0 => Duration::from_secs_f64(s.min(MAX_TOKEN_TTL.as_secs_f64())),
        _ => DEFAULT_TOKEN_TTL,
    };
    Ok(Grant {
        token: Secret::new(token),
        expires_in,
    })
}

impl Inner {
    /// Fetches a token for `scope` from `realm`, with Basic credentials when configured
    /// (anonymous otherwise).
    pub(super) async fn fetch_token(
        &self,
        realm: &BearerRealm,
        scope: &str,
    ) -> Result<Grant, UpstreamError> {
        let url = token_url(realm, scope, self.https)
            .map_err(|e| UpstreamError::Invalid(format!("{}: {e}", self.name)))?;
        let started = Instant::now();
        let resp = self
            .send(|| {
                let r = self.client.get(url.clone());
                match &self.credentials {
                    Some(c) => r.basic_auth(&c.username, Some(c.password.expose())),
                    None => r,
                }
            })
            .await?;
        let status = resp.status();
        tracing::debug!(
            upstream = %self.name,
            realm = %realm.realm,
            scope,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "upstream token request"
        );
        match self.status_error(&resp) {
            None if status == StatusCode::OK => {}
            None | Some(UpstreamError::NotFound) => {
                return Err(UpstreamError::Invalid(format!(
                    "{}: token realm answered {status}",
                    self.name
                )));
            }
            Some(e) => return Err(e),
        }
        let body = self
            .read_capped(resp, MAX_TOKEN_RESPONSE_BYTES, "token response")
            .await?;
        parse_token_response(&body)
            .map_err(|e| UpstreamError::Invalid(format!("{}: {e}", self.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_or_access_token_and_default_ttl() {
        let g = parse_token_response(br#"{"token":"abc","expires_in":300}"#).expect("ok");
        assert_eq!(
            (g.token.expose(), g.expires_in),
            ("abc", Duration::from_secs(300))
        );
        // GHCR: no expires_in.
        let g = parse_token_response(br#"{"token":"abc"}"#).expect("ok");
        assert_eq!(g.expires_in, DEFAULT_TOKEN_TTL);
        let g = parse_token_response(br#"{"access_token":"xyz","expires_in":3600}"#).expect("ok");
        assert_eq!(
            (g.token.expose(), g.expires_in),
            ("xyz", Duration::from_secs(3600))
        );
        let g = parse_token_response(br#"{"token":"","access_token":"xyz","expires_in":0}"#)
            .expect("ok");
        assert_eq!((g.token.expose(), g.expires_in), ("xyz", DEFAULT_TOKEN_TTL));
        let g = parse_token_response(br#"{"token":"t","expires_in":"120"}"#).expect("ok");
        assert_eq!(g.expires_in, Duration::from_secs(120));
        let g = parse_token_response(br#"{"token":"t","expires_in":1e30}"#).expect("ok");
        assert_eq!(g.expires_in, MAX_TOKEN_TTL);
    }

    #[test]
    fn refuses_responses_without_a_usable_token() {
        for body in [
            &br#"{}"#[..],
            br#"{"token":""}"#,
            b"not json",
            br#"{"token":"a\nb"}"#,
            br#"{"token":42}"#,
        ] {
            assert!(parse_token_response(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn errors_never_contain_the_token() {
        let e = parse_token_response(br#"{"token":"sekrit\u0001"}"#).expect_err("bad token");
        assert!(!e.contains("sekrit"), "{e}");
    }

    #[test]
    fn token_url_adds_service_and_scope() {
        let realm = BearerRealm {
            realm: "https://auth.docker.io/token?x=1".into(),
            service: Some("registry.docker.io".into()),
        };
        let url = token_url(&realm, "repository:library/alpine:pull", true).expect("url");
        assert_eq!(
            url.as_str(),
            "https://auth.docker.io/token?x=1&service=registry.docker.io\
             &scope=repository%3Alibrary%2Falpine%3Apull"
        );
        let plain = BearerRealm {
            realm: "http://auth.local/token".into(),
            service: None,
        };
        assert!(token_url(&plain, "s", true).is_err());
        assert!(token_url(&plain, "s", false).is_ok());
        let weird = BearerRealm {
            realm: "file:///etc/passwd".into(),
            service: None,
        };
        assert!(token_url(&weird, "s", false).is_err());
    }

    #[test]
    fn tokens_are_reused_shortly_before_expiry_only() {
        assert_eq!(fresh_for(Duration::from_secs(60)), Duration::from_secs(54));
        assert_eq!(
            fresh_for(Duration::from_secs(3600)),
            Duration::from_secs(3570)
        );
    }

    #[tokio::test]
    async fn cache_reuses_and_rejects() {
        let cache = TokenCache::default();
        let grant = |t: &str| {
            let t = t.to_owned();
            move || async move {
                Ok(Grant {
                    token: Secret::new(t),
                    expires_in: Duration::from_secs(300),
                })
            }
        };
        let a = cache
            .get_or_fetch("s", None, grant("one"))
            .await
            .expect("a");
        assert!(a.fetched);
        let b = cache
            .get_or_fetch("s", None, grant("two"))
            .await
            .expect("b");
        assert_eq!((b.token.expose(), b.fetched), ("one", false));
        let c = cache
            .get_or_fetch("s", Some(&b.token), grant("three"))
            .await
            .expect("c");
        assert_eq!((c.token.expose(), c.fetched), ("three", true));
        let d = cache
            .get_or_fetch("other", None, grant("four"))
            .await
            .expect("d");
        assert_eq!(d.token.expose(), "four");
    }
}
