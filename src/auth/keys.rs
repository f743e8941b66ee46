//! Issuer key pairs and the signed API keys they issue.
//!
//! Owns the API key wire format, `opk1.<payload>.<signature>`, where the payload is
//! base64url (no padding) JSON and the signature is Ed25519 over
//! `outpost-api-key-v1.` followed by the payload JSON bytes; its verification against the
//! configured issuer public keys; and the issuer key files (PKCS#8 / SPKI PEM, as written
//! by `openssl genpkey -algorithm ed25519`). It decides whether a key is authentic and
//! current; revocation and policy are [`super::Authenticator`]'s business. No error or
//! `Debug` output here ever contains a key or any part of one.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes,
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::glob::{GlobError, RepoGlobs};
use super::{Actions, Secret};
use crate::oci::RepoName;

/// Every API key starts with this; it tells keys from tokens and passwords at a glance.
pub const API_KEY_PREFIX: &str = "opk1.";

/// File names [`write_issuer_pair`] creates.
pub const ISSUER_KEY_FILE: &str = "issuer.key";
pub const ISSUER_PUB_FILE: &str = "issuer.pub";

/// Keys longer than this are refused before any decoding. Real keys are a few hundred bytes;
/// the cap bounds the work an unauthenticated caller can cause.
pub const MAX_KEY_LEN: usize = 8 * 1024;

/// How far in the future a key's issue time may lie (issuer and verifier clocks differ).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Longest subject accepted. Subjects end up in logs, so they are also free of control
/// characters.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Domain separation: a signature made for an API key is useless for anything else the
/// issuer key might ever sign, and vice versa.
const SIGNING_DOMAIN: &[u8] = b"outpost-api-key-v1.";

const PAYLOAD_VERSION: u32 = 1;

/// Verified keys remembered so the hot path skips signature verification. Cleared when
/// full: simpler than LRU, and a refill costs one verification per active key.
const VERIFIED_CACHE_CAPACITY: usize = 1024;

/// Why an API key was refused or could not be issued. Messages never contain the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("malformed API key: {0}")]
    Malformed(&'static str),
    #[error("API key was signed by an issuer that is not configured")]
    UnknownIssuer,
    #[error("API key signature is invalid")]
    BadSignature,
    #[error("API key has expired")]
    Expired,
    #[error("API key is not valid yet (issued in the future)")]
    NotYetValid,
    #[error("invalid key request: {0}")]
    InvalidRequest(String),
    #[error("the operating system provided no randomness")]
    Entropy,
}

/// Why an issuer key file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not an Ed25519 {expected} PEM file ({reason})", path.display())]
    Format {
        path: PathBuf,
        expected: &'static str,
        reason: String,
    },
    #[error("could not encode the issuer key pair: {0}")]
    Encode(String),
    #[error("the operating system provided no randomness")]
    Entropy,
}

/// The JSON payload of an API key, exactly as signed.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    v: u32,
    id: String,
    sub: String,
    iss: String,
    repos: Vec<String>,
    act: String,
    iat: u64,
    exp: u64,
}

/// What an API key says about its holder. Obtained from [`KeyVerifier::verify`] (authentic)
/// or [`decode_unverified`] (for display only).
#[derive(Clone)]
pub struct KeyClaims {
    /// 32 lowercase hex characters; what revocation names.
    pub id: String,
    pub subject: String,
    /// [`issuer_id`] of the key that signed it.
    pub issuer: String,
    pub repos: Vec<String>,
    pub actions: Actions,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; the key is refused from this second on.
    pub expires_at: u64,
    matcher: RepoGlobs,
}

impl KeyClaims {
    /// The key's actions if one of its repository globs matches `repo`, else none.
    pub fn grants(&self, repo: &RepoName) -> Actions {
        if self.matcher.is_match(repo) {
            self.actions
        } else {
            Actions::NONE
        }
    }
}

impl fmt::Debug for KeyClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyClaims")
            .field("id", &self.id)
            .field("subject", &self.subject)
            .field("issuer", &self.issuer)
            .field("repos", &self.repos)
            .field("actions", &self.actions)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What `outpost key issue` asks for.
#[derive(Clone, Debug)]
pub struct KeyRequest {
    pub subject: String,
    pub repos: Vec<String>,
    pub actions: Actions,
    pub ttl: Duration,
}

/// The short public name of an issuer key: the first 16 hex characters of the SHA-256 of
/// its 32 public key bytes. Keys carry it so the verifier picks the right public key.
pub fn issuer_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut id = hex::encode(digest);
    id.truncate(16);
    id
}

/// Signs a new API key. The returned secret is shown to the operator once and never stored.
pub fn issue_key(
    signing: &SigningKey,
    req: &KeyRequest,
    now: SystemTime,
) -> Result<(Secret, KeyClaims), KeyError> {
    let invalid = |msg: &str| KeyError::InvalidRequest(msg.to_owned());
    check_subject(&req.subject).map_err(invalid)?;
    if req.repos.is_empty() {
        return Err(invalid("at least one repository glob is required"));
    }
    RepoGlobs::compile(&req.repos).map_err(|errs| KeyError::InvalidRequest(join(&errs)))?;
    if req.actions.is_empty() {
        return Err(invalid("at least one action is required"));
    }
    if req.ttl < Duration::from_secs(1) {
        return Err(invalid("the lifetime must be at least one second"));
    }
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| invalid("the system clock is before 1970"))?
        .as_secs();
    let exp = iat
        .checked_add(req.ttl.as_secs())
        .ok_or_else(|| invalid("the lifetime is too long"))?;
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|_| KeyError::Entropy)?;

    let payload = Payload {
        v: PAYLOAD_VERSION,
        id: hex::encode(id),
        sub: req.subject.clone(),
        iss: issuer_id(&signing.verifying_key()),
        repos: req.repos.clone(),
        act: req.actions.to_string(),
        iat,
        exp,
    };
    let json = serde_json::to_vec(&payload).map_err(|_| invalid("payload cannot be encoded"))?;
    let signature = signing.sign(&signed_message(&json));
    let key = format!(
        "{API_KEY_PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(&json),
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    );
    if key.len() > MAX_KEY_LEN {
        return Err(invalid("too many or too long repository globs"));
    }
    // The same validation as verification, so nothing is issued that would be refused.
    let claims = claims_from(payload).map_err(|_| invalid("the key would not verify"))?;
    Ok((Secret::new(key), claims))
}

/// Reads a key's claims without checking its signature or expiry: for `outpost key
/// inspect` and revocation lists, never for granting access.
pub fn decode_unverified(key: &str) -> Result<KeyClaims, KeyError> {
    let parts = split(key)?;
    claims_from(parts.payload)
}

/// Verifies API keys against the configured issuer public keys.
pub struct KeyVerifier {
    issuers: Vec<(String, VerifyingKey)>,
    /// Keyed by the SHA-256 of the presented key string, so the key itself is never held.
    verified: Mutex<HashMap<[u8; 32], Arc<KeyClaims>>>,
}

impl KeyVerifier {
    pub fn new(issuers: Vec<VerifyingKey>) -> KeyVerifier {
        KeyVerifier {
            issuers: issuers.into_iter().map(|k| (issuer_id(&k), k)).collect(),
            verified: Mutex::new(HashMap::new()),
        }
    }

    pub fn issuer_count(&self) -> usize {
        self.issuers.len()
    }

    /// Checks that `key` was signed by a configured issuer and is current at `now`.
    /// Expiry is checked on every call, cached or not.
    pub fn verify(&self, key: &str, now: SystemTime) -> Result<Arc<KeyClaims>, KeyError> {
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::Malformed("too long"));
        }
        let fingerprint: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let cached = self.cache().get(&fingerprint).cloned();
        if let Some(claims) = cached {
            check_time(&claims, now)?;
            return Ok(claims);
        }
        let claims = Arc::new(self.verify_signature(key)?);
        check_time(&claims, now)?;
        let mut cache = self.cache();
        if cache.len() >= VERIFIED_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(fingerprint, Arc::clone(&claims));
        Ok(claims)
    }

    fn verify_signature(&self, key: &str) -> Result<KeyClaims, KeyError> {
        let parts = split(key)?;
        let message = signed_message(&parts.payload_json);
        let mut candidates = self
            .issuers
            .iter()
            .filter(|(id, _)| *id == parts.payload.iss)
            .peekable();
        if candidates.peek().is_none() {
            return Err(KeyError::UnknownIssuer);
        }
        // Ids are 64-bit prefixes, so two configured keys could in principle share one;
        // trying each costs nothing in the normal case of exactly one.
        if !candidates.any(|(_, k)| k.verify_strict(&message, &parts.signature).is_ok()) {
            return Err(KeyError::BadSignature);
        }
        claims_from(parts.payload)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<KeyClaims>>> {
        // The map is valid after any panic (single inserts and clears), so poison is moot.
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for KeyVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.issuers.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("KeyVerifier")
            .field("issuers", &ids)
            .finish()
    }
}

/// Creates `issuer.key` (PKCS#8 PEM, mode 0600) and `issuer.pub` (SPKI PEM) in `dir`.
/// Never overwrites: an existing file of either name is an error and leaves it untouched.
pub fn write_issuer_pair(dir: &Path) -> Result<(PathBuf, PathBuf), KeyFileError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice()).map_err(|_| KeyFileError::Entropy)?;
    let signing = SigningKey::from_bytes(&seed);
    // Without the optional embedded public key (PKCS#8 v1), exactly as OpenSSL writes it.
    let private_pem = KeypairBytes {
        secret_key: *seed,
        public_key: None,
    }
    .to_pkcs8_pem(LineEnding::LF)
    .map_err(|e| KeyFileError::Encode(e.to_string()))?;
    let public_pem = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyFileError::Encode(e.to_string()))?;

    let key_path = dir.join(ISSUER_KEY_FILE);
    let pub_path = dir.join(ISSUER_PUB_FILE);
    write_new_file(&key_path, private_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new_file(&pub_path, public_pem.as_bytes(), 0o644) {
        // A private key without its public half is useless and confusing; we created it
        // a moment ago, so it is ours to remove.
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok((key_path, pub_path))
}

/// Reads an Ed25519 private key from a PKCS#8 PEM file (`-----BEGIN PRIVATE KEY-----`).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    let text = Zeroizing::new(read_file(path)?);
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyFileError::Format {
        path: path.to_owned(),
        expected: "PKCS#8 private key",
        reason: e.to_string(),
    })
}

/// Reads an Ed25519 public key from an SPKI PEM file (`-----BEGIN PUBLIC KEY-----`).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
    let text = read_file(path)?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| KeyFileError::Format {
        path: path.to_owned(),
        expected: "SPKI public key",
        reason: e.to_string(),
    })
}

fn read_file(path: &Path) -> Result<String, KeyFileError> {
    fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyFileError> {
    let io_error = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_error)?;
    if let Err(e) = file.write_all(contents).and_then(|()| file.sync_all()) {
        // create_new succeeded, so the partial file is ours.
        let _ = fs::remove_file(path);
        return Err(io_error(e));
    }
    Ok(())
}

struct Parts {
    payload_json: Vec<u8>,
    payload: Payload,
    signature: Signature,
}

fn split(key: &str) -> Result<Parts, KeyError> {
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::Malformed("too long"));
    }
    let rest = key
        .strip_prefix(API_KEY_PREFIX)
        .ok_or(KeyError::Malformed("not an Outpost API key"))?;
    let (payload_b64, signature_b64) = rest
        .split_once('.')
        .ok_or(KeyError::Malformed("missing signature"))?;
    let payload_json = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| KeyError::Malformed("payload is not base64url"))?;
    let signature: [u8; 64] = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| KeyError::Malformed("signature is not base64url"))?
        .try_into()
        .map_err(|_| KeyError::Malformed("signature has the wrong length"))?;
    let payload = serde_json::from_slice(&payload_json)
        .map_err(|_| KeyError::Malformed("payload is not the expected JSON"))?;
    Ok(Parts {
        payload_json,
        payload,
        signature: Signature::from_bytes(&signature),
    })
}

fn signed_message(payload_json: &[u8]) -> Vec<u8> {
    [SIGNING_DOMAIN, payload_json].concat()
}

fn claims_from(p: Payload) -> Result<KeyClaims, KeyError> {
    let malformed = KeyError::Malformed;
    if p.v != PAYLOAD_VERSION {
        return Err(malformed("unsupported version"));
    }
    if !is_lower_hex(&p.id, 32) {
        return Err(malformed("bad key id"));
    }
    if !is_lower_hex(&p.iss, 16) {
        return Err(malformed("bad issuer id"));
    }
    check_subject(&p.sub).map_err(|_| malformed("bad subject"))?;
    if p.repos.is_empty() {
        return Err(malformed("no repositories"));
    }
    let matcher = RepoGlobs::compile(&p.repos).map_err(|_| malformed("bad repository glob"))?;
    let actions = Actions::parse_list(&p.act).map_err(|_| malformed("unknown action"))?;
    if actions.is_empty() {
        return Err(malformed("no actions"));
    }
    if p.exp <= p.iat {
        return Err(malformed("expires before it was issued"));
    }
    Ok(KeyClaims {
        id: p.id,
        subject: p.sub,
        issuer: p.iss,
        repos: p.repos,
        actions,
        issued_at: p.iat,
        expires_at: p.exp,
        matcher,
    })
}

fn check_time(claims: &KeyClaims, now: SystemTime) -> Result<(), KeyError> {
    let now = unix_seconds(now);
    if claims.expires_at <= now {
        return Err(KeyError::Expired);
    }
    if claims.issued_at > now.saturating_add(MAX_CLOCK_SKEW.as_secs()) {
        return Err(KeyError::NotYetValid);
    }
    Ok(())
}

/// Seconds since the Unix epoch; a clock before 1970 reads as 0, which refuses every key.
pub(crate) fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn check_subject(subject: &str) -> Result<(), &'static str> {
    if subject.trim().is_empty() {
        return Err("the subject is empty");
    }
    if subject.len() > MAX_SUBJECT_LEN {
        return Err("the subject is too long");
    }
    if subject.chars().any(char::is_control) {
        return Err("the subject contains control characters");
    }
    Ok(())
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn join(errors: &[GlobError]) -> String {
    let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
    msgs.join("; ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::Action;

    pub(crate) const T0: u64 = 1_700_000_000;

    pub(crate) fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    pub(crate) fn signing_key(byte: u8) -> SigningKey {
        SigningKey::from_bytes(&[byte; 32])
    }

    pub(crate) fn issue(
        signing: &SigningKey,
        repos: &[&str],
        actions: &str,
        ttl_secs: u64,
    ) -> (Secret, KeyClaims) {
        let req = KeyRequest {
            subject: "ci-runner".to_owned(),
            repos: repos.iter().map(|r| (*r).to_owned()).collect(),
            actions: Actions::parse_list(actions).expect("valid actions"),
            ttl: Duration::from_secs(ttl_secs),
        };
        issue_key(signing, &req, at(T0)).expect("issued")
    }

    fn repo(name: &str) -> RepoName {
        name.parse().expect("valid name")
    }

    fn segments(key: &str) -> (String, String) {
        let rest = key.strip_prefix(API_KEY_PREFIX).expect("prefix");
        let (p, s) = rest.split_once('.').expect("two segments");
        (p.to_owned(), s.to_owned())
    }

    /// Signs an arbitrary payload with a real issuer key, to reach checks behind the
    /// signature.
    fn forge(signing: &SigningKey, json: &str) -> String {
        let sig = signing.sign(&signed_message(json.as_bytes()));
        format!(
            "{API_KEY_PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(json),
            URL_SAFE_NO_PAD.encode(sig.to_bytes())
        )
    }

    #[test]
    fn issued_key_verifies_and_round_trips_its_claims() {
        let sk = signing_key(1);
        let (key, issued) = issue(&sk, &["team/**"], "pull,push", 3600);
        assert!(key.expose().starts_with(API_KEY_PREFIX));
        let verifier = KeyVerifier::new(vec![sk.verifying_key()]);
        let claims = verifier.verify(key.expose(), at(T0 + 10)).expect("valid");
        assert_eq!(claims.id, issued.id);
        assert_eq!(claims.id.len(), 32);
        assert_eq!(claims.subject, "ci-runner");
        assert_eq!(claims.issuer, issuer_id(&sk.verifying_key()));
        assert_eq!(claims.expires_at, T0 + 3600);
        assert_eq!(claims.grants(&repo("team/a/b")), issued.actions);
        let decoded = decode_unverified(key.expose()).expect("decodes");
        assert_eq!(decoded.id, issued.id);
    }

    #[test]
    fn payload_is_the_documented_json() {
        let sk = signing_key(1);
        let (key, claims) = issue(&sk, &["a/*"], "pull", 60);
        let (p, _) = segments(key.expose());
        let json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).expect("b64")).expect("json");
        let expected = serde_json::json!({
            "v": 1, "id": claims.id, "sub": "ci-runner", "iss": claims.issuer,
            "repos": ["a/*"], "act": "pull", "iat": T0, "exp": T0 + 60,
        });
        assert_eq!(json, expected);
    }

    #[test]
    fn expired_key_is_refused_even_when_cached() {
        let sk = signing_key(1);
        let (key, _) = issue(&sk, &["**"], "pull", 60);
        let verifier = KeyVerifier::new(vec![sk.verifying_key()]);
        verifier.verify(key.expose(), at(T0 + 59)).expect("valid");
        assert_eq!(
            verifier.verify(key.expose(), at(T0 + 60)).map(|_| ()),
            Err(KeyError::Expired)
        );
        let fresh = KeyVerifier::new(vec![sk.verifying_key()]);
        assert_eq!(
            fresh.verify(key.expose(), at(T0 + 1000)).map(|_| ()),
            Err(KeyError::Expired)
        );
    }

    #[test]
    fn key_from_the_future_is_refused_beyond_the_skew() {
        let sk = signing_key(1);
        let (key, _) = issue(&sk, &["**"], "pull", 3600);
        let verifier = KeyVerifier::new(vec![sk.verifying_key()]);
        verifier
            .verify(key.expose(), at(T0 - MAX_CLOCK_SKEW.as_secs()))
            .expect("within skew");
        assert_eq!(
            verifier.verify(key.expose(), at(T0 - 301)).map(|_| ()),
            Err(KeyError::NotYetValid)
        );
    }

    #[test]
    fn wrong_issuer_is_refused() {
        let (key, _) = issue(&signing_key(1), &["**"], "pull", 60);
        let verifier = KeyVerifier::new(vec![signing_key(2).verifying_key()]);
        assert_eq!(
            verifier.verify(key.expose(), at(T0)).map(|_| ()),
            Err(KeyError::UnknownIssuer)
        );
    }

    #[test]
    fn several_issuers_allow_rotation() {
        let (old, _) = issue(&signing_key(1), &["**"], "pull", 60);
        let (new, _) = issue(&signing_key(2), &["**"], "pull", 60);
        let verifier = KeyVerifier::new(vec![
            signing_key(1).verifying_key(),
            signing_key(2).verifying_key(),
        ]);
        assert_eq!(verifier.issuer_count(), 2);
        verifier.verify(old.expose(), at(T0)).expect("old issuer");
        verifier.verify(new.expose(), at(T0)).expect("new issuer");
    }

    #[test]
    fn issuer_id_forged_onto_another_issuers_payload_is_a_bad_signature() {
        let sk = signing_key(1);
        let verifier = KeyVerifier::new(vec![sk.verifying_key()]);
        let (key, claims) = issue(&signing_key(2), &["**"], "pull", 60);
        let (p, s) = segments(key.expose());
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(p).expect("b64")).expect("utf8");
        let ours = issuer_id(&sk.verifying_key());
        let relabelled = json.replace(&claims.issuer, &ours);
        let forged = format!("{API_KEY_PREFIX}{}.{s}", URL_SAFE_NO_PAD.encode(relabelled));
        assert_eq!(
            verifier.verify(&forged, at(T0)).map(|_| ()),
            Err(KeyError::BadSignature)
        );
    }

    #[test]
    fn tampered_payload_is_refused() {
        let sk = signing_key(1);
        let verifier = KeyVerifier::new(vec![sk.verifying_key()]);
        let (key, _) = issue(&sk, &["team/app"], "pull", 60);
        let (p, s) = segments(key.expose());

        // Every single flipped character of the payload segment is refused.
        for i in 0..p.len() {
            let mut bytes = p.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = format!(
                "{API_KEY_PREFIX}{}.{s}",
                String::from_utf8(bytes).expect("ascii")
            );
            assert!(verifier.verify(&tampered, at(T0)).is_err(), "position {i}");
        }

        // A well-formed but widened payload is a bad signature.
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(&p).expect("b64")).expect("utf8");
        let widened = json
            .replace("team/app", "**")
            .replace("\"pull\"", "\"pull,push\"");
        let tampered = format!("{API_KEY_PREFIX}{}.{s}", URL_SAFE_NO_PAD.encode(widened));
        assert_eq!(
            verifier.verify(&tampered, at(T0)).map(|_| ()),
            Err(KeyError::BadSignature)
        );
    }

    #[test]
    fn tampered_signature_is_refused() {
        let sk = signing_key(1);
        let verifier = KeyVerifier::new(vec![sk.verifying_key()]);
        let (key, _) = issue(&sk, &["**"], "pull", 60);
        let (p, s) = segments(key.expose());
        let mut sig = URL_SAFE_NO_PAD.decode(&s).expect("b64");
        sig[10] ^= 0x01;
        let tampered = format!("{API_KEY_PREFIX}{p}.{}", URL_SAFE_NO_PAD.encode(&sig));
        assert_eq!(
            verifier.verify(&tampered, at(T0)).map(|_| ()),
            Err(KeyError::BadSignature)
        );
        let truncated = format!("{API_KEY_PREFIX}{p}.{}", &s[..s.len() - 4]);
        assert!(matches!(
            verifier.verify(&truncated, at(T0)),
            Err(KeyError::Malformed(_))
        ));
    }

    #[test]
    fn signature_is_domain_separated() {
        // A signature over the bare payload (no domain prefix) must not verify.
        let sk = signing_key(1);
        let verifier = KeyVerifier::new(vec![sk.verifying_key()]);
        let (key, _) = issue(&sk, &["**"], "pull", 60);
        let (p, _) = segments(key.expose());
        let json = URL_SAFE_NO_PAD.decode(&p).expect("b64");
        let bare = sk.sign(&json);
        let undomained = format!(
            "{API_KEY_PREFIX}{p}.{}",
            URL_SAFE_NO_PAD.encode(bare.to_bytes())
        );
        assert_eq!(
            verifier.verify(&undomained, at(T0)).map(|_| ()),
            Err(KeyError::BadSignature)
        );
    }

    #[test]
    fn signed_but_invalid_payloads_are_malformed() {
        let sk = signing_key(1);
        let verifier = KeyVerifier::new(vec![sk.verifying_key()]);
        let valid = serde_json::json!({
            "v": 1, "id": "0123456789abcdef0123456789abcdef", "sub": "s",
            "iss": issuer_id(&sk.verifying_key()), "repos": ["a"], "act": "pull",
            "iat": 1, "exp": 2_000_000_000u64,
        });
        verifier
            .verify(&forge(&sk, &valid.to_string()), at(T0))
            .expect("control case verifies");
        let changes = [
            ("v", serde_json::json!(2)),
            ("id", serde_json::json!("xyz")),
            ("sub", serde_json::json!("")),
            ("sub", serde_json::json!("a\u{1b}b")),
            ("repos", serde_json::json!([])),
            ("repos", serde_json::json!(["a/["])),
            ("act", serde_json::json!("admin")),
            ("act", serde_json::json!("")),
            ("exp", serde_json::json!(1)),
            ("exp", serde_json::Value::Null),
            ("admin", serde_json::json!(true)),
        ];
        for (field, value) in changes {
            let mut payload = valid.clone();
            payload[field] = value;
            let key = forge(&sk, &payload.to_string());
            assert!(
                matches!(verifier.verify(&key, at(T0)), Err(KeyError::Malformed(_))),
                "{payload}"
            );
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let verifier = KeyVerifier::new(vec![signing_key(1).verifying_key()]);
        let long = format!("{API_KEY_PREFIX}{}", "A".repeat(MAX_KEY_LEN));
        for junk in ["", "opk1.", "opk1.x", "opk1.!!.??", "opt1.abc.def", &long] {
            assert!(
                matches!(verifier.verify(junk, at(T0)), Err(KeyError::Malformed(_))),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn pull_only_key_grants_no_push_and_nothing_out_of_scope() {
        let (_, claims) = issue(&signing_key(1), &["team/*"], "pull", 60);
        let granted = claims.grants(&repo("team/app"));
        assert!(granted.contains(Action::Pull));
        assert!(!granted.contains(Action::Push) && !granted.contains(Action::Delete));
        assert_eq!(claims.grants(&repo("team/app/sub")), Actions::NONE);
        assert_eq!(claims.grants(&repo("other/app")), Actions::NONE);
    }

    #[test]
    fn invalid_requests_are_refused() {
        let sk = signing_key(1);
        let good = KeyRequest {
            subject: "ci".to_owned(),
            repos: vec!["team/**".to_owned()],
            actions: Actions::PULL,
            ttl: Duration::from_secs(60),
        };
        issue_key(&sk, &good, at(T0)).expect("control case");
        let mut cases = Vec::new();
        cases.push(KeyRequest {
            subject: " ".to_owned(),
            ..good.clone()
        });
        cases.push(KeyRequest {
            subject: "a\nb".to_owned(),
            ..good.clone()
        });
        cases.push(KeyRequest {
            repos: vec![],
            ..good.clone()
        });
        cases.push(KeyRequest {
            repos: vec!["a/[".to_owned()],
            ..good.clone()
        });
        cases.push(KeyRequest {
            actions: Actions::NONE,
            ..good.clone()
        });
        cases.push(KeyRequest {
            ttl: Duration::from_millis(999),
            ..good.clone()
        });
        cases.push(KeyRequest {
            repos: vec!["x".repeat(MAX_KEY_LEN)],
            ..good.clone()
        });
        for req in &cases {
            assert!(
                matches!(
                    issue_key(&sk, req, at(T0)),
                    Err(KeyError::InvalidRequest(_))
                ),
                "{req:?}"
            );
        }
    }

    #[test]
    fn errors_never_contain_the_key() {
        let sk = signing_key(1);
        let (key, _) = issue(&sk, &["**"], "pull", 60);
        let key = key.expose();
        let (p, s) = segments(key);
        let mut bad_sig = URL_SAFE_NO_PAD.decode(&s).expect("b64");
        bad_sig[0] ^= 1;
        let attempts = [
            (
                KeyVerifier::new(vec![sk.verifying_key()]),
                key.to_owned(),
                at(T0 + 61),
            ),
            (
                KeyVerifier::new(vec![signing_key(2).verifying_key()]),
                key.to_owned(),
                at(T0),
            ),
            (
                KeyVerifier::new(vec![sk.verifying_key()]),
                format!("{API_KEY_PREFIX}{p}.{}", URL_SAFE_NO_PAD.encode(&bad_sig)),
                at(T0),
            ),
            (
                KeyVerifier::new(vec![sk.verifying_key()]),
                format!("{key}x"),
                at(T0),
            ),
        ];
        for (verifier, presented, now) in attempts {
            let err = verifier.verify(&presented, now).expect_err("refused");
            let shown = format!("{err} {err:?}");
            assert!(
                !shown.contains(&p[..16]) && !shown.contains(&s[..16]),
                "{shown}"
            );
        }
    }

    #[test]
    fn issuer_id_is_a_sha256_prefix_of_the_public_key() {
        let vk = signing_key(1).verifying_key();
        let id = issuer_id(&vk);
        assert_eq!(id.len(), 16);
        assert!(hex::encode(Sha256::digest(vk.as_bytes())).starts_with(&id));
    }

    #[test]
    fn verified_cache_never_holds_the_key_and_stays_bounded() {
        let sk = signing_key(1);
        let verifier = KeyVerifier::new(vec![sk.verifying_key()]);
        for _ in 0..VERIFIED_CACHE_CAPACITY + 5 {
            let (key, _) = issue(&sk, &["**"], "pull", 60);
            verifier.verify(key.expose(), at(T0)).expect("valid");
        }
        assert!(verifier.cache().len() <= VERIFIED_CACHE_CAPACITY);
    }

    #[test]
    fn issuer_pair_round_trips_and_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key_path, pub_path) = write_issuer_pair(dir.path()).expect("written");
        let private = fs::read_to_string(&key_path).expect("read");
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(
            fs::read_to_string(&pub_path)
                .expect("read")
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&key_path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");

        let sk = load_signing_key(&key_path).expect("loads");
        let vk = load_verifying_key(&pub_path).expect("loads");
        assert_eq!(sk.verifying_key(), vk);

        assert!(matches!(
            write_issuer_pair(dir.path()),
            Err(KeyFileError::Io { .. })
        ));
        assert_eq!(fs::read_to_string(&key_path).expect("read"), private);
    }

    #[test]
    fn existing_public_key_is_not_overwritten_and_no_orphan_private_key_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(ISSUER_PUB_FILE), "keep me").expect("write");
        assert!(write_issuer_pair(dir.path()).is_err());
        assert!(!dir.path().join(ISSUER_KEY_FILE).exists());
        assert_eq!(
            fs::read_to_string(dir.path().join(ISSUER_PUB_FILE)).expect("read"),
            "keep me"
        );
    }

    /// Generated with `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout`.
    const OPENSSL_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIH5Ymrp21bWP/wrZRRfhdiT0gPcMCUKlCDsxtu3g4nSS\n\
        -----END PRIVATE KEY-----\n";
    const OPENSSL_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEAP9k0zVGAXMb0o7eG4hfESSF64LOvrrsmzrk4GyC9Uus=\n\
        -----END PUBLIC KEY-----\n";

    #[test]
    fn reads_openssl_key_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_path = dir.path().join("k.pem");
        let pub_path = dir.path().join("p.pem");
        fs::write(&key_path, OPENSSL_PRIVATE).expect("write");
        fs::write(&pub_path, OPENSSL_PUBLIC).expect("write");
        let sk = load_signing_key(&key_path).expect("openssl private key");
        let vk = load_verifying_key(&pub_path).expect("openssl public key");
        assert_eq!(sk.verifying_key(), vk);
        assert!(matches!(
            load_signing_key(&pub_path),
            Err(KeyFileError::Format { .. })
        ));
        assert!(matches!(
            load_verifying_key(&dir.path().join("missing")),
            Err(KeyFileError::Io { .. })
        ));
    }
}
