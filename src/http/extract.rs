//! Request extractors that turn HTTP input into checked values or into the
//! contract's problem responses: the bearer-token user, JSON bodies, ids in
//! paths, and the bid headers.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::AppState;
use crate::auth::{TokenError, User};
use crate::domain::IdempotencyKey;
use crate::error::ApiError;

/// Largest accepted request body (the API contract's 16 KiB).
pub const BODY_LIMIT: usize = 16 * 1024;

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Authorization holds one credential, not a list (RFC 9110, sections
        // 5.3 and 11.6.2), so several fields are a malformed request: refused
        // as a whole rather than picking one, so that a second credential
        // cannot slip past a proxy or check that looked at the other.
        let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
        let header = values
            .next()
            .ok_or(ApiError::Unauthorized("a bearer token is required"))?;
        if values.next().is_some() {
            return Err(ApiError::InvalidRequest(
                "send exactly one Authorization header".into(),
            ));
        }
        let token = header
            .to_str()
            .ok()
            // The scheme is case-insensitive (RFC 9110, section 11.1).
            .and_then(|h| h.split_once(' '))
            .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer").then_some(token))
            .ok_or(ApiError::Unauthorized(
                "the Authorization header must be 'Bearer <token>'",
            ))?;
        state.jwt.verify(token.trim()).map_err(|e| match e {
            TokenError::Expired => ApiError::Unauthorized("the token has expired"),
            TokenError::NotYetValid => ApiError::Unauthorized("the token is not valid yet"),
            TokenError::Invalid => ApiError::Unauthorized("the token is invalid"),
        })
    }
}

/// A JSON object body (`application/json`, at most [`BODY_LIMIT`] bytes)
/// read into the request type `T`, whose fields say the body's shape;
/// their values are judged by the handler, which reports every invalid
/// field at once.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = read_bytes(req, state).await?;
        // An object of the right shape is read straight into `T` (which
        // would also take an array); anything else is read again as a
        // map, for the contract's message.
        if bytes.trim_ascii_start().starts_with(b"{") {
            if let Ok(body) = serde_json::from_slice(&bytes) {
                return Ok(JsonBody(body));
            }
        }
        let map = object(&bytes)?;
        serde_json::from_value(Value::Object(map))
            .map(JsonBody)
            .map_err(|e| ApiError::InvalidRequest(format!("malformed JSON: {e}")))
    }
}

/// The whole body, within [`BODY_LIMIT`].
async fn read_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(BODY_LIMIT)
        } else {
            ApiError::InvalidRequest("the request body could not be read".into())
        }
    })
}

/// `bytes` as a JSON object, or the contract's problem with it.
fn object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidRequest(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidRequest(format!("malformed JSON: {e}"))),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let (kind, subtype) = essence.split_at_checked(12).unwrap_or((essence, ""));
    kind.eq_ignore_ascii_case("application/")
        && (subtype.eq_ignore_ascii_case("json")
            || (subtype.len() >= 5
                && subtype.as_bytes()[subtype.len() - 5..].eq_ignore_ascii_case(b"+json")))
}

/// The `{id}` segment of a path, as sent; a segment that is not even
/// UTF-8 is 400 `invalid_request` like any malformed id.
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(id)| PathId(id))
            .map_err(|_| ApiError::InvalidRequest("the id in the path is malformed".into()))
    }
}

/// Parses an id taken from a path: malformed is 400 `invalid_request`.
pub fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::InvalidRequest(format!("'{raw}' is not a valid {what} id")))
}

/// The `Idempotency-Key` header: missing is 400 `idempotency_key_missing`,
/// malformed 400 `invalid_request`.
fn idempotency_key(headers: &HeaderMap) -> Result<IdempotencyKey, ApiError> {
    let raw = headers
        .get("idempotency-key")
        .ok_or(ApiError::IdempotencyKeyMissing)?;
    let raw = raw
        .to_str()
        .map_err(|_| ApiError::InvalidRequest("Idempotency-Key must be visible ASCII".into()))?;
    IdempotencyKey::parse(raw).map_err(ApiError::InvalidRequest)
}

/// The headers of a bid: its `Idempotency-Key` (judged when the handler
/// asks, so problems are reported in the contract's order) and its
/// `Prefer: wait`. Read from the request head without copying it.
pub struct BidHeaders {
    pub key: Result<IdempotencyKey, ApiError>,
    pub wait: Option<u64>,
}

impl<S: Send + Sync> FromRequestParts<S> for BidHeaders {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(BidHeaders {
            key: idempotency_key(&parts.headers),
            wait: prefer_wait(&parts.headers),
        })
    }
}

/// Most seconds a client may ask to wait for its bid's outcome.
pub const MAX_WAIT_S: u64 = 10;

/// The `wait=N` preference of RFC 7240 (`Prefer: wait=3`), capped at
/// [`MAX_WAIT_S`]; an absent or unreadable preference is ignored, as the
/// RFC asks.
fn prefer_wait(headers: &HeaderMap) -> Option<u64> {
    prefer_wait_up_to(headers, MAX_WAIT_S)
}

/// The `wait=N` preference, capped at `most` seconds.
pub fn prefer_wait_up_to(headers: &HeaderMap, most: u64) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|pref| {
            let (name, value) = pref.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("wait")
                .then(|| value.trim().trim_matches('"').parse::<u64>().ok())?
        })
        .next()
        .map(|n| n.min(most))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn prefer_wait_parses_rfc7240_forms() {
        assert_eq!(prefer_wait(&headers(&[("prefer", "wait=3")])), Some(3));
        assert_eq!(
            prefer_wait(&headers(&[("prefer", "respond-async, wait=5")])),
            Some(5)
        );
        assert_eq!(
            prefer_wait(&headers(&[("prefer", "wait=100")])),
            Some(MAX_WAIT_S)
        );
        assert_eq!(prefer_wait(&headers(&[("prefer", "wait=soon")])), None);
        assert_eq!(prefer_wait(&headers(&[])), None);
    }

    #[test]
    fn json_content_types() {
        assert!(is_json(&headers(&[("content-type", "application/json")])));
        assert!(is_json(&headers(&[(
            "content-type",
            "application/json; charset=utf-8"
        )])));
        assert!(is_json(&headers(&[(
            "content-type",
            "application/merge-patch+json"
        )])));
        assert!(is_json(&headers(&[("content-type", "Application/JSON")])));
        assert!(!is_json(&headers(&[("content-type", "application/jsonx")])));
        assert!(!is_json(&headers(&[("content-type", "text/plain")])));
        assert!(!is_json(&headers(&[])));
    }
}
