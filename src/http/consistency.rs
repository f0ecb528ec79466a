//! Read-your-writes over HTTP: the opaque `Gavel-Consistency-Token` carries
//! a WAL position of the primary (after the client's write, or one its last
//! read had seen); a read that sends it back is served only by a server
//! that has replayed that far. Routed reads also say which server answered
//! in `Gavel-Read-From` (`primary` or `replica`).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use base64::Engine as _;
use tokio_postgres::types::PgLsn;

use crate::db::reads::ReadSource;
use crate::error::ApiError;

/// The token header, on responses and on requests.
pub static CONSISTENCY_TOKEN: HeaderName = HeaderName::from_static("gavel-consistency-token");
/// Which server answered a read.
pub static READ_FROM: HeaderName = HeaderName::from_static("gavel-read-from");

const PREFIX: &str = "lsn:";

/// The token for a WAL position.
fn encode(position: PgLsn) -> HeaderValue {
    let token =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{PREFIX}{position}"));
    HeaderValue::from_str(&token).expect("base64 is a valid header value")
}

/// Puts the token for `position` on a response.
pub fn insert_token(headers: &mut HeaderMap, position: PgLsn) {
    headers.insert(CONSISTENCY_TOKEN.clone(), encode(position));
}

/// The WAL position in a token this service issued.
pub fn decode(token: &str) -> Option<PgLsn> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    text.strip_prefix(PREFIX)?.parse().ok()
}

/// The consistency token a request carries, if any.
pub struct ReadToken(pub Option<PgLsn>);

impl<S: Send + Sync> FromRequestParts<S> for ReadToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(&CONSISTENCY_TOKEN) else {
            return Ok(ReadToken(None));
        };
        value
            .to_str()
            .ok()
            .and_then(decode)
            .map(|position| ReadToken(Some(position)))
            .ok_or_else(|| {
                ApiError::InvalidRequest(
                    "Gavel-Consistency-Token must be a token this service returned".into(),
                )
            })
    }
}

/// Marks `response` with the server that answered and, when `with_token`,
/// a token covering both the request's token and what the read saw.
pub fn mark_read(
    response: &mut Response,
    source: &ReadSource,
    token: Option<PgLsn>,
    with_token: bool,
) {
    let headers = response.headers_mut();
    headers.insert(
        READ_FROM.clone(),
        HeaderValue::from_static(source.target.as_str()),
    );
    let position = match (token, source.position) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    if let (true, Some(position)) = (with_token, position) {
        insert_token(headers, position);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_foreign_tokens_are_refused() {
        let position: PgLsn = "16/B374D848".parse().unwrap();
        let token = encode(position);
        assert_eq!(decode(token.to_str().unwrap()), Some(position));
        for bad in ["", "lsn:0/1", "bm9wZQ", "bHNuOnh5eg", "%%%"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
