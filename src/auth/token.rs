//! Short-lived bearer tokens, handed out by `/token` in the registry token flow.
//!
//! Owns the token wire format, `opt1.<payload>.<mac>`: base64url (no padding) JSON and an
//! HMAC-SHA256 over `outpost-token-v1.` followed by the payload JSON bytes, keyed by a
//! secret that every Outpost process behind one name shares. A token records what was
//! granted when it was issued; it never widens later. It carries the id of the API key it
//! came from, so revoking the key kills its tokens too (checked by the caller).

use std::fmt;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::keys::{MAX_CLOCK_SKEW, unix_seconds};
use super::{Actions, Secret};
use crate::oci::RepoName;

/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "opt1.";

/// Tokens longer than this are refused before decoding; it also bounds what we issue, as
/// tokens travel in request headers.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Domain separation: the MAC key might one day authenticate something else too.
const MAC_DOMAIN: &[u8] = b"outpost-token-v1.";

const PAYLOAD_VERSION: u32 = 1;

/// HMAC-SHA256's block size: RFC 2104 zero-pads shorter keys to it, so padding once here
/// gives the same MAC as keying with the 32 secret bytes, without a fallible constructor.
const HMAC_BLOCK: usize = 64;

/// Why a token was refused. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (issued in the future)")]
    NotYetValid,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    v: u32,
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    /// Issued to a central-registry user (`sub` is the user name).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cu: bool,
    grants: Vec<(String, String)>,
    iat: u64,
    exp: u64,
}

/// What a token grants, and to whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub subject: String,
    /// The API key the token was obtained with, if any.
    pub key_id: Option<String>,
    /// Issued to a central-registry user: pulls of central repositories also need that
    /// user's cached central decision.
    pub central: bool,
    pub grants: Vec<(RepoName, Actions)>,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; the token is refused from this second on.
    pub expires_at: u64,
}

impl TokenClaims {
    /// Everything the token grants on `repo` (exact names: tokens are issued per scope).
    pub fn grants_for(&self, repo: &RepoName) -> Actions {
        self.grants
            .iter()
            .filter(|(r, _)| r == repo)
            .fold(Actions::NONE, |acc, (_, a)| acc.union(*a))
    }
}

/// Issues and verifies tokens with one shared secret.
pub struct TokenSigner {
    key: Zeroizing<[u8; HMAC_BLOCK]>,
}

impl TokenSigner {
    pub fn new(secret: [u8; 32]) -> TokenSigner {
        let mut key = Zeroizing::new([0u8; HMAC_BLOCK]);
        key[..secret.len()].copy_from_slice(&secret);
        TokenSigner { key }
    }

    pub fn issue(&self, claims: &TokenClaims) -> Secret {
        let payload = Payload {
            v: PAYLOAD_VERSION,
            sub: claims.subject.clone(),
            kid: claims.key_id.clone(),
            cu: claims.central,
            grants: claims
                .grants
                .iter()
                .map(|(r, a)| (r.to_string(), a.to_string()))
                .collect(),
            iat: claims.issued_at,
            exp: claims.expires_at,
        };
        // Strings and integers always serialize; were that ever to fail, the empty payload
        // makes a token that never verifies rather than a panic.
        let json = serde_json::to_vec(&payload).unwrap_or_default();
        let mac = self.mac(&json).finalize().into_bytes();
        Secret::new(format!(
            "{TOKEN_PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(mac)
        ))
    }

    /// Checks the MAC (in constant time) before looking at the payload, then expiry.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<TokenClaims, TokenError> {
        let malformed = TokenError::Malformed;
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed("too long"));
        }
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(malformed("not an Outpost token"))?;
        let (payload_b64, mac_b64) = rest.split_once('.').ok_or(malformed("missing signature"))?;
        let json = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| malformed("payload is not base64url"))?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac_b64)
            .map_err(|_| malformed("signature is not base64url"))?;
        self.mac(&json)
            .verify_slice(&mac)
            .map_err(|_| TokenError::BadSignature)?;

        let payload: Payload = serde_json::from_slice(&json)
            .map_err(|_| malformed("payload is not the expected JSON"))?;
        if payload.v != PAYLOAD_VERSION {
            return Err(malformed("unsupported version"));
        }
        let grants = payload
            .grants
            .into_iter()
            .map(|(repo, actions)| Some((repo.parse().ok()?, Actions::parse_list(&actions).ok()?)))
            .collect::<Option<Vec<_>>>()
            .ok_or(malformed("bad grant"))?;

        let now = unix_seconds(now);
        if payload.exp <= now {
            return Err(TokenError::Expired);
        }
        if payload.iat > now.saturating_add(MAX_CLOCK_SKEW.as_secs()) {
            return Err(TokenError::NotYetValid);
        }
        Ok(TokenClaims {
            subject: payload.sub,
            key_id: payload.kid,
            central: payload.cu,
            grants,
            issued_at: payload.iat,
            expires_at: payload.exp,
        })
    }

    fn mac(&self, payload_json: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new(&(*self.key).into());
        mac.update(MAC_DOMAIN);
        mac.update(payload_json);
        mac
    }
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSigner([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Action;
    use crate::auth::keys::tests::{T0, at};

    fn repo(name: &str) -> RepoName {
        name.parse().expect("valid name")
    }

    fn claims(grants: &[(&str, &str)]) -> TokenClaims {
        TokenClaims {
            subject: "ci-runner".to_owned(),
            key_id: Some("0123456789abcdef0123456789abcdef".to_owned()),
            central: false,
            grants: grants
                .iter()
                .map(|(r, a)| (repo(r), Actions::parse_list(a).expect("valid")))
                .collect(),
            issued_at: T0,
            expires_at: T0 + 300,
        }
    }

    fn segments(token: &str) -> (String, String) {
        let rest = token.strip_prefix(TOKEN_PREFIX).expect("prefix");
        let (p, m) = rest.split_once('.').expect("two segments");
        (p.to_owned(), m.to_owned())
    }

    #[test]
    fn round_trips() {
        let signer = TokenSigner::new([7; 32]);
        let issued = claims(&[("team/app", "pull,push"), ("team/lib", "pull")]);
        let token = signer.issue(&issued);
        assert!(token.expose().starts_with(TOKEN_PREFIX));
        let verified = signer.verify(token.expose(), at(T0 + 1)).expect("valid");
        assert_eq!(verified, issued);
        let anonymous = TokenClaims {
            key_id: None,
            central: false,
            grants: vec![],
            ..issued
        };
        let token = signer.issue(&anonymous);
        assert_eq!(signer.verify(token.expose(), at(T0)), Ok(anonymous));
    }

    #[test]
    fn token_for_one_repo_grants_nothing_on_another() {
        let c = claims(&[("team/app", "pull,push")]);
        assert!(c.grants_for(&repo("team/app")).contains(Action::Push));
        assert_eq!(c.grants_for(&repo("team/other")), Actions::NONE);
        assert_eq!(c.grants_for(&repo("team/app/sub")), Actions::NONE);
    }

    #[test]
    fn expired_token_is_refused() {
        let signer = TokenSigner::new([7; 32]);
        let token = signer.issue(&claims(&[("a", "pull")]));
        signer.verify(token.expose(), at(T0 + 299)).expect("valid");
        assert_eq!(
            signer.verify(token.expose(), at(T0 + 300)),
            Err(TokenError::Expired)
        );
        assert_eq!(
            signer.verify(token.expose(), at(T0 - 301)),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn other_secret_is_refused() {
        let token = TokenSigner::new([7; 32]).issue(&claims(&[("a", "pull")]));
        assert_eq!(
            TokenSigner::new([8; 32]).verify(token.expose(), at(T0)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let signer = TokenSigner::new([7; 32]);
        let token = signer.issue(&claims(&[("team/app", "pull")]));
        let (p, m) = segments(token.expose());
        for i in 0..p.len() {
            let mut bytes = p.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = format!(
                "{TOKEN_PREFIX}{}.{m}",
                String::from_utf8(bytes).expect("ascii")
            );
            assert!(signer.verify(&tampered, at(T0)).is_err(), "position {i}");
        }
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(&p).expect("b64")).expect("utf8");
        let widened = json.replace("\"pull\"", "\"pull,push,delete\"");
        let tampered = format!("{TOKEN_PREFIX}{}.{m}", URL_SAFE_NO_PAD.encode(widened));
        assert_eq!(
            signer.verify(&tampered, at(T0)),
            Err(TokenError::BadSignature)
        );
        let mut mac = URL_SAFE_NO_PAD.decode(&m).expect("b64");
        mac[0] ^= 1;
        let tampered = format!("{TOKEN_PREFIX}{p}.{}", URL_SAFE_NO_PAD.encode(&mac));
        assert_eq!(
            signer.verify(&tampered, at(T0)),
            Err(TokenError::BadSignature)
        );
        let truncated = format!("{TOKEN_PREFIX}{p}.{}", URL_SAFE_NO_PAD.encode(&mac[..16]));
        assert_eq!(
            signer.verify(&truncated, at(T0)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let signer = TokenSigner::new([7; 32]);
        let long = format!("{TOKEN_PREFIX}{}", "A".repeat(MAX_TOKEN_LEN));
        for junk in ["", "opt1.", "opt1.abc", "opt1.!.!", "opk1.abc.def", &long] {
            assert!(
                matches!(signer.verify(junk, at(T0)), Err(TokenError::Malformed(_))),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn padded_key_gives_the_standard_hmac() {
        let secret = [7u8; 32];
        let mut standard = Hmac::<Sha256>::new_from_slice(&secret).expect("any length");
        standard.update(MAC_DOMAIN);
        standard.update(b"payload");
        assert_eq!(
            TokenSigner::new(secret)
                .mac(b"payload")
                .finalize()
                .into_bytes(),
            standard.finalize().into_bytes()
        );
    }

    #[test]
    fn errors_and_debug_never_contain_the_token_or_secret() {
        let signer = TokenSigner::new([0x41; 32]);
        assert_eq!(format!("{signer:?}"), "TokenSigner([REDACTED])");
        let token = signer.issue(&claims(&[("a", "pull")]));
        let (p, m) = segments(token.expose());
        for (verifier, now) in [
            (TokenSigner::new([8; 32]), at(T0)),
            (TokenSigner::new([0x41; 32]), at(T0 + 1000)),
        ] {
            let err = verifier.verify(token.expose(), now).expect_err("refused");
            let shown = format!("{err} {err:?}");
            assert!(
                !shown.contains(&p[..12]) && !shown.contains(&m[..12]),
                "{shown}"
            );
        }
    }
}
