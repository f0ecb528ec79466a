//! Bearer tokens: HS256 JWTs signed with `GAVEL_JWT_SECRET`. The algorithm
//! is pinned (a token claiming `none` or any other algorithm is refused),
//! `exp`, `aud` and `sub` are required, and an `nbf` (optional) is honoured:
//! a token is refused before its `nbf` just as after its `exp`.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use quick_cache::sync::Cache;
use serde::{Deserialize, Serialize};

use crate::domain::UserId;

/// A role a token may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May bid (every authenticated user may).
    Bidder,
    /// May create auctions.
    Seller,
    /// May create auctions and read anything.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bidder" => Ok(Role::Bidder),
            "seller" => Ok(Role::Seller),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role '{other}' (expected bidder, seller or admin)"
            )),
        }
    }
}

/// The claims Gavel reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Audience; must equal the configured one.
    pub aud: String,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before, seconds since the epoch. Typed here (not only checked by
    /// `jsonwebtoken`, which skips an `nbf` it cannot read) so that a
    /// present but malformed `nbf` (a string, a negative number) makes the
    /// token invalid instead of silently unrestricted, like a malformed `exp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Granted roles.
    #[serde(default)]
    pub roles: Vec<Role>,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct User {
    /// The token's `sub`.
    pub id: UserId,
    /// The token's roles.
    pub roles: Vec<Role>,
    /// The token's `exp`, in Unix seconds: a stream ends when it passes.
    pub expires_at: u64,
}

impl User {
    /// Whether the caller has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        self.has(Role::Admin)
    }
}

/// Why a token was refused (the message is safe to show).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Expired (`exp` in the past).
    #[error("the token has expired")]
    Expired,
    /// Not valid yet (`nbf` in the future).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// Anything else: bad signature, wrong algorithm or audience, bad claims.
    #[error("the token is invalid")]
    Invalid,
}

/// Clock-skew allowance, in seconds, for both `exp` and `nbf` (jsonwebtoken
/// applies one leeway to both): none, so a token is refused from the second
/// after its `exp` and until the second of its `nbf`.
pub const LEEWAY_S: u64 = 0;

/// How many verified tokens [`JwtKeys`] keeps: about 350 bytes each, so
/// at most about 23 MiB.
const VERIFIED_TOKENS: usize = 65_536;

/// Signing and verification keys for one secret and audience.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    audience: String,
    /// Tokens verified lately, by their exact text: a client sends the
    /// same token with every request, and its signature and claims need
    /// checking once. Only tokens that verified enter; each use checks
    /// `exp` and `nbf` again against the clock.
    verified: Arc<Cache<Box<str>, Verified>>,
}

/// A token that verified: its user, and the time window it is valid in.
#[derive(Clone)]
struct Verified {
    user: User,
    nbf: Option<u64>,
}

impl Verified {
    /// The user, if the token is valid at `now` (Unix seconds), by the
    /// rules `jsonwebtoken` applies with no leeway.
    fn at(self, now: u64) -> Result<User, TokenError> {
        if self.user.expires_at < now {
            Err(TokenError::Expired)
        } else if self.nbf.is_some_and(|nbf| nbf > now) {
            Err(TokenError::NotYetValid)
        } else {
            Ok(self.user)
        }
    }
}

impl JwtKeys {
    /// Keys for `secret`, accepting tokens for `audience`.
    pub fn new(secret: &str, audience: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = LEEWAY_S;
        validation.validate_exp = true;
        // Off by default in jsonwebtoken; without it a token minted for later
        // use would work at once.
        validation.validate_nbf = true;
        JwtKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            audience: audience.to_owned(),
            verified: Arc::new(Cache::new(VERIFIED_TOKENS)),
        }
    }

    /// Verifies a token and returns its user.
    pub fn verify(&self, token: &str) -> Result<User, TokenError> {
        self.verify_at(token, unix_now())
    }

    /// [`verify`](Self::verify) at `now` (Unix seconds) for a token seen
    /// before; a new token is checked whole, on `jsonwebtoken`'s clock.
    fn verify_at(&self, token: &str, now: u64) -> Result<User, TokenError> {
        if let Some(verified) = self.verified.get(token) {
            return verified.at(now);
        }
        let verified = self.decode(token)?;
        let user = verified.user.clone();
        self.verified.insert(token.into(), verified);
        Ok(user)
    }

    /// Checks a token's signature and claims.
    fn decode(&self, token: &str) -> Result<Verified, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                _ => TokenError::Invalid,
            })?;
        let id = UserId::parse(&data.claims.sub).map_err(|_| TokenError::Invalid)?;
        Ok(Verified {
            user: User {
                id,
                roles: data.claims.roles,
                expires_at: data.claims.exp,
            },
            nbf: data.claims.nbf,
        })
    }

    /// Signs a token for `sub` with `roles`, valid for `ttl_s` seconds.
    pub fn mint(&self, sub: &str, roles: &[Role], ttl_s: u64) -> String {
        let now = unix_now();
        let claims = Claims {
            sub: sub.to_owned(),
            exp: now + ttl_s,
            aud: self.audience.clone(),
            iat: Some(now),
            nbf: None,
            roles: roles.to_vec(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn b64(data: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    }

    #[test]
    fn a_minted_token_verifies() {
        let keys = JwtKeys::new(SECRET, "gavel");
        let user = keys
            .verify(&keys.mint("alice", &[Role::Seller], 60))
            .unwrap();
        assert_eq!(user.id.as_str(), "alice");
        assert!(user.has(Role::Seller));
        assert!(!user.is_admin());
    }

    #[test]
    fn refuses_wrong_audience_secret_expiry_and_alg_none() {
        let keys = JwtKeys::new(SECRET, "gavel");
        let other_aud = JwtKeys::new(SECRET, "other").mint("alice", &[], 60);
        assert_eq!(keys.verify(&other_aud).unwrap_err(), TokenError::Invalid);
        let other_secret = JwtKeys::new(&"x".repeat(32), "gavel").mint("alice", &[], 60);
        assert_eq!(keys.verify(&other_secret).unwrap_err(), TokenError::Invalid);

        let expired = Claims {
            sub: "a".into(),
            exp: unix_now() - 10,
            aud: "gavel".into(),
            iat: None,
            nbf: None,
            roles: vec![],
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &expired,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(keys.verify(&token).unwrap_err(), TokenError::Expired);

        let claims = format!(r#"{{"sub":"a","aud":"gavel","exp":{}}}"#, unix_now() + 60);
        let unsigned = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&claims));
        assert_eq!(keys.verify(&unsigned).unwrap_err(), TokenError::Invalid);
    }

    #[test]
    fn a_token_seen_before_is_still_refused_outside_its_time_window() {
        let keys = JwtKeys::new(SECRET, "gavel");
        let now = unix_now();
        let token =
            signed(serde_json::json!({"sub": "a", "aud": "gavel", "exp": now + 60, "nbf": now}));
        assert_eq!(keys.verify_at(&token, now).unwrap().id.as_str(), "a");
        assert!(
            keys.verified.get(token.as_str()).is_some(),
            "kept once verified"
        );
        // Seen again: the cached verdict follows the same rules as a decode.
        assert_eq!(
            keys.verify_at(&token, now + 60).unwrap().expires_at,
            now + 60
        );
        assert_eq!(
            keys.verify_at(&token, now + 61).unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            keys.verify_at(&token, now - 1).unwrap_err(),
            TokenError::NotYetValid
        );
        // A token that failed is never kept, so it is checked whole each time.
        let forged = format!("{}x", token);
        assert_eq!(keys.verify(&forged).unwrap_err(), TokenError::Invalid);
        assert!(keys.verified.get(forged.as_str()).is_none());
    }

    fn signed(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn honours_nbf() {
        let keys = JwtKeys::new(SECRET, "gavel");
        let now = unix_now();
        let with_nbf = |nbf: serde_json::Value| {
            signed(serde_json::json!({"sub": "a", "aud": "gavel", "exp": now + 600, "nbf": nbf}))
        };

        // Before nbf (beyond the leeway): refused like an expired token.
        for ahead in [LEEWAY_S + 2, 3600] {
            assert_eq!(
                keys.verify(&with_nbf((now + ahead).into())).unwrap_err(),
                TokenError::NotYetValid,
                "nbf {ahead} s ahead"
            );
        }
        // From nbf on (and without nbf): accepted.
        for nbf in [now - 3600, now - 1, now] {
            assert_eq!(keys.verify(&with_nbf(nbf.into())).unwrap().id.as_str(), "a");
        }
        assert!(keys.verify(&with_nbf(serde_json::Value::Null)).is_ok());
        // An nbf that is not a NumericDate is not ignored.
        for bad in [serde_json::json!("tomorrow"), serde_json::json!(-5)] {
            assert_eq!(
                keys.verify(&with_nbf(bad.clone())).unwrap_err(),
                TokenError::Invalid,
                "nbf {bad}"
            );
        }
    }
}
