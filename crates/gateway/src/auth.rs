//! HS256 JWT authentication (DESIGN section 2): verifying client tokens and minting them for
//! `imgate token` and the development endpoint.
//!
//! Tokens are never logged; errors say why a token was refused without echoing it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Secret;

/// The secret used when none is configured. Public by design: it only ever signs tokens
/// for a gateway that listens on loopback and says so in its log.
pub const DEV_SECRET: &str = "imgate-development-secret-do-not-use-in-production";

/// The sender of admin messages; no token may speak for it.
pub const SYSTEM: &str = "system";

/// Clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: String,
    pub admin: bool,
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
}

/// Verifies and mints tokens with one HS256 secret.
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    dev_mode: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("dev_mode", &self.dev_mode)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// `None` selects the development secret.
    pub fn new(secret: Option<&Secret>) -> Self {
        let (bytes, dev_mode) = match secret {
            Some(s) => (s.0.as_bytes(), false),
            None => (DEV_SECRET.as_bytes(), true),
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = LEEWAY_SECS;
        Auth {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
            dev_mode,
        }
    }

    /// True when running with the public development secret.
    pub fn dev_mode(&self) -> bool {
        self.dev_mode
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                _ => AuthError::Invalid(e.to_string()),
            })?;
        if !imgate_proto::ids::is_valid_id(&data.claims.sub) || data.claims.sub == SYSTEM {
            return Err(AuthError::BadSubject);
        }
        Ok(Identity {
            uid: data.claims.sub,
            admin: data.claims.role.as_deref() == Some("admin"),
        })
    }

    /// A token for `uid` valid for `ttl` from now.
    pub fn mint(&self, uid: &str, ttl: Duration, admin: bool) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        self.mint_with_exp(uid, exp, admin)
    }

    /// A token with an explicit `exp` (Unix seconds); tests use it for expired tokens.
    pub fn mint_with_exp(&self, uid: &str, exp: u64, admin: bool) -> String {
        let claims = Claims {
            sub: uid.to_owned(),
            exp,
            role: admin.then(|| "admin".to_owned()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of a small claim set cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_then_verify() {
        let auth = Auth::new(Some(&Secret("s3cret".into())));
        assert!(!auth.dev_mode());
        let t = auth.mint("alice", Duration::from_secs(60), false);
        assert_eq!(
            auth.verify(&t).unwrap(),
            Identity {
                uid: "alice".into(),
                admin: false
            }
        );
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
        assert!(matches!(
            auth.verify("nonsense"),
            Err(AuthError::Invalid(_))
        ));
    }
}
