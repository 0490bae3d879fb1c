//! Credentials: user JWTs (spec §2 "Handshake") and backend API keys (§3).
//!
//! A token is verified with the configured key *for its algorithm family*:
//! HS* only with `HERALD_JWT_SECRET`, RS*/PS*/ES*/EdDSA only with a public key
//! from `HERALD_JWT_PUBLIC_KEYS` whose type matches (chosen by `kid`). So a
//! public key can never be used as an HMAC secret, and `none` never parses.
//! Public keys come from a file read at start, or from an identity
//! provider's JWKS endpoint, fetched again as it rotates keys ([`jwks`]).
//! No function here logs a token.

pub mod jwks;
pub mod revocations;

use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::JwtSettings;
use crate::telemetry::Metrics;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token was given")]
    Missing,
    #[error("the token is expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(&'static str),
    /// The user's tokens issued before a time were revoked
    /// (`POST /v1/users/{id}/tokens/revoke`), and this is one of them; or
    /// this very token was (`POST /v1/users/{id}/tokens/{jti}/revoke`).
    #[error("the token was revoked; get a new one")]
    Revoked,
}

/// Whether revoking a user's tokens issued before `issued_before` covers one
/// issued at `issued_at`. A token without `iat` is covered by any revocation:
/// nothing shows it is newer.
pub fn revokes(issued_before: i64, issued_at: Option<i64>) -> bool {
    issued_at.is_none_or(|iat| iat < issued_before)
}

/// A verified user token.
#[derive(Debug, Clone)]
pub struct UserToken {
    pub user_id: Arc<str>,
    /// `exp`, unix seconds.
    pub expires_at: i64,
    /// `iat`, unix seconds, when the token has one (a revocation refuses a
    /// token without it).
    pub issued_at: Option<i64>,
    /// `jti`, when the token has one a backend could name to revoke it
    /// alone ([`token_id`]).
    pub token_id: Option<Arc<str>>,
}

impl UserToken {
    /// What a session keeps of the token it runs on.
    pub fn session_token(&self) -> crate::hub::SessionToken {
        crate::hub::SessionToken { expires_at: self.expires_at, issued_at: self.issued_at, jti: self.token_id.clone() }
    }
}

/// A token's `jti` as one that can be revoked alone: a string of 1 to 256
/// bytes without control characters, what `POST
/// /v1/users/{id}/tokens/{jti}/revoke` accepts. Any other `jti` (RFC 7519
/// asks for a string; some issuers send numbers) is accepted and ignored:
/// no revocation can name it, so it is not kept.
pub fn token_id(jti: Option<serde_json::Value>) -> Option<Arc<str>> {
    match jti {
        Some(serde_json::Value::String(id)) if check_token_id(&id).is_ok() => Some(id.into()),
        _ => None,
    }
}

/// A `jti` a single-token revocation may name.
pub fn check_token_id(jti: &str) -> Result<(), &'static str> {
    if crate::api::publish::is_plain_name(jti, 256) {
        Ok(())
    } else {
        Err("a jti is 1 to 256 bytes, without control characters")
    }
}

/// The claims Herald reads. `exp` and `iat` are NumericDates (RFC 7519
/// §2): whole seconds, or with a fraction, which is dropped — an `exp` so
/// ends a little early, an `iat` looks a little older to a revocation.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(deserialize_with = "numeric_date")]
    pub exp: i64,
    #[serde(default, deserialize_with = "optional_numeric_date", skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Read as any JSON value, so a token with a `jti` of another type is
    /// not refused for it ([`token_id`] keeps only strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<serde_json::Value>,
}

/// A NumericDate: a JSON number of seconds, whole or not, in `i64` range.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumericDate {
    Whole(i64),
    Fraction(f64),
}

impl NumericDate {
    fn seconds<E: serde::de::Error>(self) -> Result<i64, E> {
        match self {
            NumericDate::Whole(s) => Ok(s),
            // `as` saturates; a NaN cannot come from JSON.
            NumericDate::Fraction(f) if f.is_finite() => Ok(f.floor() as i64),
            NumericDate::Fraction(_) => Err(E::custom("a NumericDate must be a finite number")),
        }
    }
}

fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    NumericDate::deserialize(d)?.seconds()
}

fn optional_numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<NumericDate>::deserialize(d)?.map(NumericDate::seconds).transpose()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl Family {
    /// The key family of a public-key algorithm; `None` for HMAC and anything unknown.
    fn of(alg: Algorithm) -> Option<Family> {
        use Algorithm::*;
        match alg {
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some(Family::Rsa),
            ES256 | ES384 => Some(Family::Ec),
            EdDSA => Some(Family::Ed),
            _ => None,
        }
    }
}

struct PublicKey {
    key: DecodingKey,
    family: Family,
    /// A JWK's `alg`, when it names one: then only that algorithm.
    alg: Option<Algorithm>,
}

/// Public keys from a PEM file (one key, no `kid`) or a JWKS file (by `kid`).
pub struct KeySet {
    /// Each key with its `kid` (PEM keys have none).
    keys: Vec<(Option<String>, PublicKey)>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}")]
    Parse(String),
    #[error("cannot fetch the JWKS from {0}: {1}")]
    Fetch(String, String),
}

impl KeySet {
    pub fn load(path: &Path) -> Result<KeySet, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyFileError::Read(path.display().to_string(), e))?;
        if text.trim_start().starts_with('{') {
            Self::from_jwks(&text)
        } else {
            Self::from_pem(text.as_bytes())
        }
    }

    fn from_pem(pem: &[u8]) -> Result<KeySet, KeyFileError> {
        let key = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            PublicKey { key: k, family: Family::Rsa, alg: None }
        } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            PublicKey { key: k, family: Family::Ec, alg: None }
        } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
            PublicKey { key: k, family: Family::Ed, alg: None }
        } else {
            return Err(KeyFileError::Parse("not a PEM public key (RSA, EC or Ed25519) nor a JWKS".into()));
        };
        Ok(KeySet { keys: vec![(None, key)] })
    }

    fn from_jwks(text: &str) -> Result<KeySet, KeyFileError> {
        Self::parse_jwks(text, false).map(|(keys, _)| keys)
    }

    /// A JWKS as an identity provider serves it: keys Herald cannot verify
    /// signatures with — meant for encryption (`use: enc`), symmetric, or of
    /// a type or algorithm it does not know — are skipped rather than
    /// refused (and listed, with why, in the second value), since providers
    /// list such keys beside their signing keys. At least one usable key
    /// must remain.
    fn from_provider_jwks(text: &str) -> Result<(KeySet, Vec<String>), KeyFileError> {
        Self::parse_jwks(text, true)
    }

    fn parse_jwks(text: &str, skip_unusable: bool) -> Result<(KeySet, Vec<String>), KeyFileError> {
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document =
            serde_json::from_str(text).map_err(|e| KeyFileError::Parse(format!("not a JWKS: {e}")))?;
        let mut keys = Vec::with_capacity(document.keys.len());
        let mut skipped = Vec::new();
        for (i, value) in document.keys.into_iter().enumerate() {
            let kid = value.get("kid").and_then(serde_json::Value::as_str).map(str::to_string);
            match Self::parse_jwk(value, skip_unusable) {
                Ok(key) => keys.push((kid, key)),
                Err(why) if skip_unusable => {
                    skipped.push(format!("{}: {why}", kid.unwrap_or_else(|| format!("key {i}"))))
                }
                Err(why) => return Err(KeyFileError::Parse(format!("key {i}: {why}"))),
            }
        }
        if keys.is_empty() {
            let why = if skipped.is_empty() {
                String::new()
            } else {
                format!(" Herald can verify with ({})", skipped.join("; "))
            };
            return Err(KeyFileError::Parse(format!("the JWKS holds no key{why}")));
        }
        if keys.len() > 1 && keys.iter().any(|(kid, _)| kid.is_none()) {
            return Err(KeyFileError::Parse("a JWKS with several keys needs a `kid` on each".into()));
        }
        Ok((KeySet { keys }, skipped))
    }

    /// One JWK; `signatures_only`: a key marked for encryption is refused too.
    fn parse_jwk(value: serde_json::Value, signatures_only: bool) -> Result<PublicKey, String> {
        let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("not a JWK: {e}"))?;
        if signatures_only && jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            return Err("meant for encryption (use: enc)".into());
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(_) => Family::Ec,
            AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
            AlgorithmParameters::OctetKey(_) => {
                return Err("symmetric (oct) keys do not belong in a public key set; use HERALD_JWT_SECRET".into())
            }
            _ => return Err("unsupported key type".into()),
        };
        let alg = match jwk.common.key_algorithm {
            Some(a) => Some(a.to_string().parse::<Algorithm>().map_err(|_| format!("unsupported alg {a}"))?),
            None => None,
        };
        if alg.is_some_and(|a| Family::of(a) != Some(family)) {
            return Err("alg does not match the key type".into());
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
        Ok(PublicKey { key, family, alg })
    }

    /// The `kid` of every key (for logs).
    fn kids(&self) -> Vec<Option<String>> {
        self.keys.iter().map(|(kid, _)| kid.clone()).collect()
    }

    /// The key named by `kid`; a token without `kid` (or a PEM file's one
    /// key, which has none) needs the file to hold exactly one key.
    fn pick(&self, kid: Option<&str>) -> Option<&PublicKey> {
        let named = kid.and_then(|kid| self.keys.iter().find(|(k, _)| k.as_deref() == Some(kid)));
        match (named, self.keys.as_slice()) {
            (Some((_, key)), _) => Some(key),
            (None, [(k, key)]) if kid.is_none() || k.is_none() => Some(key),
            _ => None,
        }
    }
}

/// Where public keys come from.
enum PublicKeys {
    /// `HERALD_JWT_PUBLIC_KEYS`, read at start.
    File(Arc<KeySet>),
    /// `HERALD_JWT_JWKS_URL`, fetched at start and refreshed.
    Remote(Arc<jwks::RemoteKeys>),
}

impl PublicKeys {
    fn current(&self) -> Arc<KeySet> {
        match self {
            PublicKeys::File(keys) => keys.clone(),
            PublicKeys::Remote(keys) => keys.current(),
        }
    }
}

/// The refusal of a token whose `kid` the key set does not hold.
const UNKNOWN_KID: &str = "unknown kid";

/// Verifies user tokens. Cheap to share behind an `Arc`.
pub struct Verifier {
    secret: Option<DecodingKey>,
    public: Option<PublicKeys>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

impl Verifier {
    /// A verifier with the secret and the key file of `settings`; a JWKS
    /// endpoint is fetched by [`fetch_jwks`](Self::fetch_jwks).
    pub fn new(settings: &JwtSettings) -> Result<Verifier, KeyFileError> {
        install_crypto_provider();
        let file = settings.public_keys.as_deref().map(KeySet::load).transpose()?;
        Ok(Verifier {
            secret: settings.secret.as_ref().map(|s| DecodingKey::from_secret(s.as_bytes())),
            public: file.map(|keys| PublicKeys::File(Arc::new(keys))),
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway: settings.leeway_secs,
        })
    }

    /// With `HERALD_JWT_JWKS_URL`: fetches the key set (an error if that
    /// fails) and keeps it fresh until `stop`. Without: nothing.
    pub async fn fetch_jwks(
        &mut self,
        settings: &JwtSettings,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Result<(), KeyFileError> {
        if let Some(url) = &settings.jwks_url {
            let keys = jwks::RemoteKeys::start(url, &settings.jwks_ca, settings.jwks_refresh, stop, metrics).await?;
            self.public = Some(PublicKeys::Remote(keys));
        }
        Ok(())
    }

    /// [`verify`](Self::verify), except that a token naming a `kid` the
    /// fetched key set does not hold makes the set be fetched again first
    /// (rate-limited; see [`jwks`]): a key the provider just rotated in is
    /// accepted at once.
    pub async fn verify_fresh(&self, token: &str) -> Result<UserToken, AuthError> {
        let asked = tokio::time::Instant::now();
        match self.verify(token) {
            Err(AuthError::Invalid(UNKNOWN_KID)) => match &self.public {
                Some(PublicKeys::Remote(keys)) if keys.refresh_for_unknown_kid(asked).await => self.verify(token),
                _ => Err(AuthError::Invalid(UNKNOWN_KID)),
            },
            other => other,
        }
    }

    pub fn verify(&self, token: &str) -> Result<UserToken, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token or unknown algorithm"))?;
        // RFC 7515 §4.1.11: a recipient that does not understand an extension
        // listed in `crit` must refuse the token; Herald understands none.
        if header.crit.is_some() {
            return Err(AuthError::Invalid("critical header extensions are not supported"));
        }
        let public_keys;
        let key = match Family::of(header.alg) {
            None if is_hmac(header.alg) => {
                self.secret.as_ref().ok_or(AuthError::Invalid("HMAC tokens are not accepted here"))?
            }
            None => return Err(AuthError::Invalid("unsupported algorithm")),
            Some(family) => {
                let keys = self.public.as_ref().ok_or(AuthError::Invalid("public-key tokens are not accepted here"))?;
                public_keys = keys.current();
                let key = public_keys.pick(header.kid.as_deref()).ok_or(AuthError::Invalid(UNKNOWN_KID))?;
                if key.family != family || key.alg.is_some_and(|a| a != header.alg) {
                    return Err(AuthError::Invalid("the algorithm does not match the key"));
                }
                &key.key
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        // A configured `iss` / `aud` must be present, not only match when
        // present: jsonwebtoken checks them only if required.
        let mut required = vec!["exp", "sub"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            match e.kind() {
                ExpiredSignature => AuthError::Expired,
                ImmatureSignature => AuthError::Invalid("not valid yet (nbf)"),
                InvalidIssuer => AuthError::Invalid("wrong issuer"),
                InvalidAudience => AuthError::Invalid("wrong audience"),
                InvalidSignature => AuthError::Invalid("bad signature"),
                MissingRequiredClaim(_) => AuthError::Invalid("a required claim (sub, exp, iss or aud) is missing"),
                _ => AuthError::Invalid("malformed token"),
            }
        })?;
        let sub = data.claims.sub;
        if crate::api::publish::check_user_id(&sub).is_err() {
            return Err(AuthError::Invalid("sub must be 1 to 256 bytes, without control characters"));
        }
        Ok(UserToken {
            user_id: sub.into(),
            expires_at: data.claims.exp,
            issued_at: data.claims.iat,
            token_id: token_id(data.claims.jti),
        })
    }
}

/// jsonwebtoken picks its crypto backend from features; installing it
/// explicitly keeps a second backend elsewhere in the graph from making it
/// ambiguous. Idempotent.
fn install_crypto_provider() {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

/// Mints an HS256 user token (the `herald token` command, dev mode, tests)
/// with a fresh `jti`, so that it can be revoked alone.
pub fn mint(secret: &str, sub: &str, ttl_secs: i64) -> String {
    mint_named(secret, sub, ttl_secs, &uuid::Uuid::now_v7().to_string())
}

/// [`mint`] with this `jti`.
pub fn mint_named(secret: &str, sub: &str, ttl_secs: i64, jti: &str) -> String {
    let now = unix_now();
    mint_claims(secret, &Claims { sub: sub.into(), exp: now + ttl_secs, iat: Some(now), jti: Some(jti.into()) })
}

/// Mints an HS256 token with exactly these claims.
pub fn mint_claims(secret: &str, claims: &Claims) -> String {
    install_crypto_provider();
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("HS256 signing cannot fail")
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// What a backend API key may do (spec §3: "a right credential without the
/// right" is a 403). A key from `HERALD_API_KEYS` may do everything; the
/// `HERALD_API_KEYS_PUBLISH` / `_READ` / `_ERASE` / `_DISCONNECT` lists grant one scope each,
/// and a key listed in several has the union.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub const NONE: Scopes = Scopes(0);
    /// `POST /v1/notifications`, the status of the jobs it starts, and
    /// marking a user's notifications read.
    pub const PUBLISH: Scopes = Scopes(1);
    /// A user's history, unread counts and presence, and job status.
    pub const READ: Scopes = Scopes(2);
    /// `DELETE /v1/users/{id}/notifications`.
    pub const ERASE: Scopes = Scopes(4);
    /// `DELETE /v1/users/{id}/sessions`.
    pub const DISCONNECT: Scopes = Scopes(8);
    pub const ALL: Scopes = Scopes(15);
    const NAMES: [(Scopes, &'static str); 4] = [
        (Scopes::PUBLISH, "publish"),
        (Scopes::READ, "read"),
        (Scopes::ERASE, "erase"),
        (Scopes::DISCONNECT, "disconnect"),
    ];

    pub const fn bits(self) -> u8 {
        self.0
    }

    pub const fn from_bits(bits: u8) -> Scopes {
        Scopes(bits & Scopes::ALL.0)
    }

    pub const fn union(self, other: Scopes) -> Scopes {
        Scopes(self.0 | other.0)
    }

    /// Whether this grants at least one of `wanted`.
    pub const fn any_of(self, wanted: Scopes) -> bool {
        self.0 & wanted.0 != 0
    }

    /// `"publish, read"`; `"none"` when empty.
    pub fn names(self) -> String {
        let names: Vec<&str> = Scopes::NAMES.iter().filter(|(s, _)| self.any_of(*s)).map(|(_, n)| *n).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

/// One configured API key and what it may do.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyGrant {
    pub key: String,
    pub scopes: Scopes,
}

/// Backend API keys, compared in constant time: every configured key is
/// compared with the presented one, whatever matched before.
pub struct ApiKeys(Vec<(Vec<u8>, Scopes)>);

impl ApiKeys {
    pub fn new(grants: &[ApiKeyGrant]) -> ApiKeys {
        ApiKeys(grants.iter().map(|g| (g.key.as_bytes().to_vec(), g.scopes)).collect())
    }

    /// The scopes of `presented` (the union over every grant of that key);
    /// `None` when it is not a configured key.
    pub fn check(&self, presented: &str) -> Option<Scopes> {
        let p = presented.as_bytes();
        let (found, bits) = self.0.iter().fold((false, 0u8), |(found, bits), (key, scopes)| {
            let hit = constant_time_eq(key, p);
            (found | hit, bits | (scopes.0 * u8::from(hit)))
        });
        found.then_some(Scopes(bits))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer value of an `Authorization` header.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(secret: &str) -> Verifier {
        Verifier::new(&JwtSettings { secret: Some(secret.into()), ..Default::default() }).unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_carry_the_subject() {
        let v = verifier("0123456789abcdef");
        let t = v.verify(&mint("0123456789abcdef", "alice", 60)).unwrap();
        assert_eq!(&*t.user_id, "alice");
        assert_eq!(
            v.verify(&mint("another-secret-16b", "alice", 60)).unwrap_err(),
            AuthError::Invalid("bad signature")
        );
        assert_eq!(v.verify(&mint("0123456789abcdef", "alice", -10)).unwrap_err(), AuthError::Expired);
    }

    #[test]
    fn alg_none_is_refused() {
        // {"alg":"none","typ":"JWT"}.{"sub":"alice","exp":9999999999}.
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(matches!(verifier("0123456789abcdef").verify(t), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn a_token_with_critical_extensions_is_refused() {
        let v = verifier("0123456789abcdef");
        let claims = serde_json::json!({"sub": "alice", "exp": unix_now() + 60});
        let key = EncodingKey::from_secret(b"0123456789abcdef");
        for crit in [vec!["b64".to_string()], vec!["exp".into()], vec![]] {
            let mut header = Header::new(Algorithm::HS256);
            header.crit = Some(crit.clone());
            let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
            assert!(matches!(v.verify(&token), Err(AuthError::Invalid(_))), "crit {crit:?}");
        }
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(v.verify(&token).is_ok());
    }

    /// RFC 7519 NumericDates may carry a fraction: such a token verifies
    /// (its fraction dropped), and is still refused once expired or before
    /// its `nbf`; a date out of range is refused.
    #[test]
    fn numeric_dates_with_a_fraction_are_read() {
        let v = verifier("0123456789abcdef");
        let key = EncodingKey::from_secret(b"0123456789abcdef");
        let sign = |claims: serde_json::Value| {
            v.verify(&jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap())
        };
        let now = unix_now();
        let t = sign(serde_json::json!({"sub": "a", "exp": now as f64 + 60.5, "iat": now as f64 - 0.25})).unwrap();
        assert_eq!((t.expires_at, t.issued_at), (now + 60, Some(now - 1)));
        let t = sign(serde_json::json!({"sub": "a", "exp": now + 60, "nbf": now as f64 - 0.5})).unwrap();
        assert_eq!((t.expires_at, t.issued_at), (now + 60, None));
        assert_eq!(sign(serde_json::json!({"sub": "a", "exp": now as f64 - 10.5})).unwrap_err(), AuthError::Expired);
        let early = sign(serde_json::json!({"sub": "a", "exp": now + 60, "nbf": now as f64 + 100.5}));
        assert_eq!(early.unwrap_err(), AuthError::Invalid("not valid yet (nbf)"));
        for exp in [1e300, -1e300] {
            assert!(matches!(sign(serde_json::json!({"sub": "a", "exp": exp})), Err(AuthError::Invalid(_))), "{exp}");
        }
        assert!(matches!(sign(serde_json::json!({"sub": "a", "exp": "soon"})), Err(AuthError::Invalid(_))));
        assert!(matches!(
            sign(serde_json::json!({"sub": "a", "exp": now + 60, "iat": "x"})),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn a_configured_issuer_and_audience_must_be_present() {
        let v = Verifier::new(&JwtSettings {
            secret: Some("0123456789abcdef".into()),
            issuer: Some("https://auth.example.com".into()),
            audience: Some("herald".into()),
            ..Default::default()
        })
        .unwrap();
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"0123456789abcdef"),
            )
            .unwrap()
        };
        let exp = unix_now() + 60;
        let iss = "https://auth.example.com";
        assert!(v.verify(&sign(serde_json::json!({"sub": "a", "exp": exp, "iss": iss, "aud": "herald"}))).is_ok());
        for claims in [
            serde_json::json!({"sub": "a", "exp": exp, "aud": "herald"}),
            serde_json::json!({"sub": "a", "exp": exp, "iss": iss}),
        ] {
            assert!(matches!(v.verify(&sign(claims)), Err(AuthError::Invalid(_))));
        }
    }

    #[test]
    fn api_keys_compare_whole_values() {
        let grant = |key: &str, scopes| ApiKeyGrant { key: key.into(), scopes };
        let keys = ApiKeys::new(&[
            grant("k-one", Scopes::ALL),
            grant("k-two", Scopes::PUBLISH),
            grant("k-two", Scopes::ERASE),
            grant("k-three", Scopes::READ),
        ]);
        assert_eq!(keys.check("k-one"), Some(Scopes::ALL));
        assert_eq!(keys.check("k-two"), Some(Scopes::PUBLISH.union(Scopes::ERASE)));
        assert_eq!(keys.check("k-three"), Some(Scopes::READ));
        assert_eq!(keys.check("k-tw"), None);
        assert_eq!(keys.check(""), None);
        assert!(Scopes::READ.any_of(Scopes::PUBLISH.union(Scopes::READ)));
        assert!(!Scopes::ERASE.any_of(Scopes::PUBLISH.union(Scopes::READ)));
        assert_eq!(Scopes::PUBLISH.union(Scopes::ERASE).names(), "publish, erase");
        assert_eq!(Scopes::NONE.names(), "none");
        assert_eq!(Scopes::ALL.names(), "publish, read, erase, disconnect");
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
    }
}
