//! JWT authentication (docs/protocol.md, "Ids and tokens"): verifying client tokens, signed
//! with an HS256 secret or with public keys (RS256, ES256, EdDSA) from a PEM file or a JWKS
//! document, and minting HS256 tokens for `imgate token` and the development endpoint.
//!
//! Only the algorithms of the configured keys are accepted: never `none`, no HS256 token
//! when only public keys are configured, no public-key token when only a secret is. The key
//! files are read again by [`Auth::reload`] (on SIGHUP); a reload that fails keeps the keys
//! in use. Tokens are never logged; errors say why a token was refused without echoing it.
//!
//! [`Revocations`] (admin kick with `revoke`) are checked here too, so every way in (login,
//! `refresh`, WebSocket upgrade, HTTP) refuses a revoked token alike. This module only
//! keeps them in memory: the store persists them and the bus carries them to other gateways.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Secret};

/// The secret used when none is configured. Public by design: it only ever signs tokens
/// for a gateway that listens on loopback and says so in its log.
pub const DEV_SECRET: &str = "imgate-development-secret-do-not-use-in-production";

/// The sender of admin messages; no token may speak for it.
pub const SYSTEM: &str = "system";

/// Clock skew tolerated on `exp`.
pub const LEEWAY_SECS: u64 = 5;

/// A token without `iat` counts as issued this long before its `exp`, for revocations
/// (docs/protocol.md, "Ids and tokens").
pub const ASSUMED_LIFETIME_SECS: u64 = 24 * 3600;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
}

/// Who a verified token speaks for, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: String,
    pub admin: bool,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issue time, Unix seconds, when the token has one.
    pub iat: Option<u64>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token subject is not a valid uid (or is the reserved uid \"system\")")]
    BadSubject,
    #[error("token revoked: an administrator revoked this user's tokens issued at or before {0} (Unix seconds)")]
    Revoked(u64),
}

/// Per uid, the time (Unix seconds) at or before which its tokens were issued are refused.
/// A value only ever rises.
#[derive(Debug, Default)]
pub struct Revocations {
    before: RwLock<std::collections::HashMap<String, u64>>,
}

impl Revocations {
    /// Refuses `uid`'s tokens issued at or before `before` from now on (a lower value than
    /// the one held changes nothing).
    pub fn raise(&self, uid: &str, before: u64) {
        let mut map = self.before.write().unwrap_or_else(|p| p.into_inner());
        let v = map.entry(uid.to_owned()).or_insert(0);
        *v = (*v).max(before);
    }

    /// The revocation time of `uid`, if any.
    pub fn of(&self, uid: &str) -> Option<u64> {
        let map = self.before.read().unwrap_or_else(|p| p.into_inner());
        map.get(uid).copied()
    }

    /// Whether a token of `uid` with these claims was revoked. Issue times count in whole
    /// seconds, so a token issued in the second of the revocation is revoked too.
    fn check(&self, uid: &str, iat: Option<u64>, exp: u64) -> Result<(), AuthError> {
        match self.of(uid) {
            Some(before) if iat.unwrap_or(exp.saturating_sub(ASSUMED_LIFETIME_SECS)) <= before => {
                Err(AuthError::Revoked(before))
            }
            _ => Ok(()),
        }
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("reading the JWT key file {path}: {reason}")]
pub struct KeyError {
    pub path: PathBuf,
    pub reason: String,
}

/// Where the verification keys come from, besides the HS256 secret.
#[derive(Debug, Clone, Default)]
pub struct KeySources {
    /// One public key, PEM (RSA, EC P-256 or Ed25519).
    pub public_key: Option<PathBuf>,
    /// A JWKS document; a token's `kid` picks the key.
    pub jwks: Option<PathBuf>,
    /// `iss` that tokens must carry, when set.
    pub issuer: Option<String>,
    /// `aud` that tokens must carry, when set.
    pub audience: Option<String>,
}

impl KeySources {
    /// The key files and required claims of `--jwt-*`.
    pub fn of(cfg: &Config) -> KeySources {
        KeySources {
            public_key: cfg.auth.jwt_public_key_file.clone(),
            jwks: cfg.auth.jwt_jwks_file.clone(),
            issuer: cfg.auth.jwt_issuer.clone(),
            audience: cfg.auth.jwt_audience.clone(),
        }
    }
}

/// A public verification key.
struct PublicKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens with the configured keys, and mints HS256 tokens with the secret.
pub struct Auth {
    /// The HS256 secret (or the development secret): signs and verifies.
    secret: Option<(EncodingKey, DecodingKey)>,
    public: RwLock<Arc<Vec<PublicKey>>>,
    sources: KeySources,
    validation: Validation,
    dev_mode: bool,
    revocations: Arc<Revocations>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("dev_mode", &self.dev_mode)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// HS256 only; `None` selects the development secret.
    pub fn new(secret: Option<&Secret>) -> Self {
        Self::build(secret, KeySources::default(), Vec::new())
    }

    /// The secret (if any) and the public keys of `sources`; with neither, the development
    /// secret.
    pub fn with_keys(secret: Option<&Secret>, sources: KeySources) -> Result<Self, KeyError> {
        let public = load_public(&sources)?;
        Ok(Self::build(secret, sources, public))
    }

    fn build(secret: Option<&Secret>, sources: KeySources, public: Vec<PublicKey>) -> Self {
        let has_public = sources.public_key.is_some() || sources.jwks.is_some();
        let (secret, dev_mode) = match (secret, has_public) {
            (Some(s), _) => (Some(s.0.as_bytes()), false),
            (None, true) => (None, false),
            (None, false) => (Some(DEV_SECRET.as_bytes()), true),
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = LEEWAY_SECS;
        // A token that is not valid yet is refused like an expired one (same leeway).
        validation.validate_nbf = true;
        match &sources.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &sources.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Auth {
            secret: secret.map(|b| (EncodingKey::from_secret(b), DecodingKey::from_secret(b))),
            public: RwLock::new(Arc::new(public)),
            sources,
            validation,
            dev_mode,
            revocations: Arc::default(),
        }
    }

    /// The revocations every verification checks.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// True when running with the public development secret.
    pub fn dev_mode(&self) -> bool {
        self.dev_mode
    }

    /// True when there are key files to read again.
    pub fn has_key_files(&self) -> bool {
        self.sources.public_key.is_some() || self.sources.jwks.is_some()
    }

    /// Reads the key files again; tokens are checked against the new keys from now on. On
    /// an error the keys in use stay.
    pub fn reload(&self) -> Result<usize, KeyError> {
        let fresh = load_public(&self.sources)?;
        let n = fresh.len();
        *self.public.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(n)
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let public = self
            .public
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let key = match header.alg {
            Algorithm::HS256 => match &self.secret {
                Some((_, d)) => d,
                None => return Err(invalid("HS256 tokens are not accepted here")),
            },
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => {
                pick(&public, header.alg, header.kid.as_deref())?
            }
            other => return Err(invalid(&format!("algorithm {other:?} is not accepted"))),
        };
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => invalid("not valid yet (nbf is in the future)"),
            ErrorKind::InvalidSignature => invalid("bad signature"),
            ErrorKind::InvalidIssuer => invalid("wrong issuer (iss)"),
            ErrorKind::InvalidAudience => invalid("wrong audience (aud)"),
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let c = data.claims;
        if !imgate_proto::ids::is_valid_id(&c.sub) || c.sub == SYSTEM {
            return Err(AuthError::BadSubject);
        }
        self.revocations.check(&c.sub, c.iat, c.exp)?;
        Ok(Identity {
            uid: c.sub,
            admin: c.role.as_deref() == Some("admin"),
            exp: c.exp,
            iat: c.iat,
        })
    }

    /// A token for `uid` valid for `ttl` from now.
    pub fn mint(&self, uid: &str, ttl: Duration, admin: bool) -> String {
        let exp = unix_now().saturating_add(ttl.as_secs());
        self.mint_with_exp(uid, exp, admin)
    }

    /// A token with an explicit `exp` (Unix seconds); tests use it for expired tokens.
    ///
    /// # Panics
    /// Without a secret (only public keys configured): such a gateway cannot sign.
    pub fn mint_with_exp(&self, uid: &str, exp: u64, admin: bool) -> String {
        let claims = Claims {
            sub: uid.to_owned(),
            exp,
            iat: Some(unix_now()),
            role: admin.then(|| "admin".to_owned()),
        };
        let (encoding, _) = self
            .secret
            .as_ref()
            .expect("minting needs the HS256 secret");
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .expect("HS256 signing of a small claim set cannot fail")
    }

    /// True when this gateway can sign tokens (it has a secret).
    pub fn can_mint(&self) -> bool {
        self.secret.is_some()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn invalid(why: &str) -> AuthError {
    AuthError::Invalid(why.to_owned())
}

/// The key for a token of `alg` naming `kid`: the key with that `kid`, else the PEM-file
/// key of that algorithm (it has no `kid`, and providers put one in every token); for a
/// token without `kid`, the only key of that algorithm.
fn pick<'a>(
    keys: &'a [PublicKey],
    alg: Algorithm,
    kid: Option<&str>,
) -> Result<&'a DecodingKey, AuthError> {
    let mut of_alg = keys.iter().filter(|k| k.alg == alg);
    let found = match kid {
        Some(kid) => keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .or_else(|| keys.iter().find(|k| k.kid.is_none() && k.alg == alg))
            .ok_or_else(|| invalid("unknown key id (kid)"))?,
        None => match (of_alg.next(), of_alg.next()) {
            (Some(k), None) => k,
            (None, _) => return Err(invalid(&format!("no {alg:?} key is configured"))),
            (Some(_), Some(_)) => return Err(invalid("the token names no key id (kid)")),
        },
    };
    if found.alg != alg {
        return Err(invalid(&format!(
            "key {:?} is not a {alg:?} key",
            found.kid.as_deref().unwrap_or_default()
        )));
    }
    Ok(&found.key)
}

fn load_public(sources: &KeySources) -> Result<Vec<PublicKey>, KeyError> {
    let mut keys = Vec::new();
    if let Some(path) = &sources.public_key {
        keys.push(pem_key(path)?);
    }
    if let Some(path) = &sources.jwks {
        keys.extend(jwks_keys(path)?);
    }
    Ok(keys)
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|e| key_error(path, e.to_string()))
}

fn key_error(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// A PEM public key; its type says its algorithm.
fn pem_key(path: &Path) -> Result<PublicKey, KeyError> {
    let pem = read(path)?;
    type Load = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
    let tries: [(Algorithm, Load); 3] = [
        (Algorithm::RS256, DecodingKey::from_rsa_pem),
        (Algorithm::ES256, DecodingKey::from_ec_pem),
        (Algorithm::EdDSA, DecodingKey::from_ed_pem),
    ];
    tries
        .iter()
        .find_map(|(alg, load)| {
            load(&pem).ok().map(|key| PublicKey {
                kid: None,
                alg: *alg,
                key,
            })
        })
        .ok_or_else(|| key_error(path, "not a PEM RSA, EC P-256 or Ed25519 public key"))
}

/// Every RS256, ES256 and EdDSA key of a JWKS document.
fn jwks_keys(path: &Path) -> Result<Vec<PublicKey>, KeyError> {
    let set: JwkSet = serde_json::from_slice(&read(path)?)
        .map_err(|e| key_error(path, format!("not a JWKS document: {e}")))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let inferred = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Some(Algorithm::ES256)
            }
            AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
            _ => None,
        };
        let alg = match jwk.common.key_algorithm {
            Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
            Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
            Some(_) => None,
            None => inferred,
        };
        let name = jwk.common.key_id.clone().unwrap_or_default();
        let Some(alg) = alg.filter(|a| Some(*a) == inferred) else {
            return Err(key_error(
                path,
                format!("key {name:?}: only RS256, ES256 (P-256) and EdDSA keys are accepted"),
            ));
        };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| key_error(path, format!("key {name:?}: {e}")))?;
        keys.push(PublicKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err(key_error(path, "no keys in it"));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_then_verify() {
        let auth = Auth::new(Some(&Secret("s3cret".into())));
        assert!(!auth.dev_mode());
        let t = auth.mint("alice", Duration::from_secs(60), false);
        let id = auth.verify(&t).unwrap();
        assert_eq!((id.uid.as_str(), id.admin), ("alice", false));
        assert!(id.iat.is_some() && id.exp > id.iat.unwrap());
        let t = auth.mint("root", Duration::from_secs(60), true);
        assert!(auth.verify(&t).unwrap().admin);
    }

    #[test]
    fn refusals() {
        let auth = Auth::new(Some(&Secret("s3cret".into())));
        let other = Auth::new(None);
        assert!(other.dev_mode());
        let t = other.mint("alice", Duration::from_secs(60), false);
        assert_eq!(
            auth.verify(&t),
            Err(AuthError::Invalid("bad signature".into()))
        );
        let expired = auth.mint_with_exp("alice", 1_000_000, false);
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        let bad_uid = auth.mint("al.ice", Duration::from_secs(60), false);
        assert_eq!(auth.verify(&bad_uid), Err(AuthError::BadSubject));
        let reserved = auth.mint(SYSTEM, Duration::from_secs(60), true);
        assert_eq!(auth.verify(&reserved), Err(AuthError::BadSubject));
        assert_eq!(auth.verify(""), Err(AuthError::Missing));
        let (key, _) = auth.secret.as_ref().unwrap();
        let with_nbf = |nbf: u64| {
            let c = serde_json::json!({"sub": "alice", "exp": unix_now() + 600, "nbf": nbf});
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, key).unwrap()
        };
        assert_eq!(
            auth.verify(&with_nbf(unix_now() + 60)),
            Err(AuthError::Invalid(
                "not valid yet (nbf is in the future)".into()
            ))
        );
        assert!(
            auth.verify(&with_nbf(unix_now() + 2)).is_ok(),
            "within the leeway"
        );
        assert!(auth.verify(&with_nbf(unix_now() - 60)).is_ok());
        assert!(matches!(
            auth.verify("nonsense"),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn a_revocation_refuses_tokens_issued_up_to_it_and_no_later_ones() {
        let auth = Auth::new(Some(&Secret("s3cret".into())));
        let now = unix_now();
        let token = auth.mint("alice", Duration::from_secs(3600), false);
        let bob = auth.mint("bob", Duration::from_secs(3600), false);
        auth.revocations().raise("alice", now - 10);
        assert!(auth.verify(&token).is_ok(), "issued after the revocation");
        auth.revocations().raise("alice", now);
        assert_eq!(auth.verify(&token), Err(AuthError::Revoked(now)));
        auth.revocations().raise("alice", now - 100);
        assert_eq!(auth.revocations().of("alice"), Some(now), "never lowered");
        assert!(auth.verify(&bob).is_ok(), "other users are not touched");
        // Without iat a token counts as issued 24 h before its exp.
        let (key, _) = auth.secret.as_ref().unwrap();
        let no_iat = |exp| {
            let c = Claims {
                sub: "alice".into(),
                exp,
                iat: None,
                role: None,
            };
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, key).unwrap()
        };
        let issued_before = no_iat(now + ASSUMED_LIFETIME_SECS - 60);
        assert_eq!(auth.verify(&issued_before), Err(AuthError::Revoked(now)));
        assert!(auth
            .verify(&no_iat(now + ASSUMED_LIFETIME_SECS + 60))
            .is_ok());
    }
}
