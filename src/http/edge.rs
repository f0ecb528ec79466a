//! The request-level edge: limits on the request head that Gavel enforces
//! below hyper's own (so Gavel, not hyper, answers them in the contract's
//! shape), request ids, and reading the body in full under its own short
//! timeout before the request may take an in-flight slot or a connection.

use std::task::Poll;
use std::time::Duration;

use axum::body::{Body, HttpBody as _};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use uuid::Uuid;

use super::extract::BODY_LIMIT;
use super::REQUEST_ID;
use crate::error::ApiError;

/// Longest request target (path and query) Gavel serves.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header fields in a request.
pub const MAX_HEADER_FIELDS: usize = 64;
/// Most bytes of header names and values in a request, together.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Longest client-chosen `X-Request-Id` that is echoed.
const MAX_REQUEST_ID: usize = 200;

/// The `414` or `431` for a request whose target or headers exceed
/// Gavel's limits; `None` for a request within them.
pub fn head_refusal(request: &Request) -> Option<Response> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if target > MAX_URI_BYTES {
        refused("uri_too_long");
        return Some(ApiError::UriTooLong(MAX_URI_BYTES).into_response());
    }
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > MAX_HEADER_FIELDS || bytes > MAX_HEADER_BYTES {
        refused("headers_too_large");
        return Some(
            ApiError::HeadersTooLarge {
                fields: MAX_HEADER_FIELDS,
                bytes: MAX_HEADER_BYTES,
            }
            .into_response(),
        );
    }
    None
}

/// The request's id: its `X-Request-Id` when that is sent once and is
/// short visible ASCII, else a fresh UUID put in its place.
pub fn request_id(request: &mut Request) -> HeaderValue {
    let headers = request.headers_mut();
    let mut ids = headers.get_all(&REQUEST_ID).iter();
    if let (Some(id), None) = (ids.next(), ids.next()) {
        if is_valid_request_id(id.as_bytes()) {
            return id.clone();
        }
    }
    let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
    let id = Uuid::new_v4().hyphenated().encode_lower(&mut text);
    let id = HeaderValue::from_str(id).expect("a UUID is a header value");
    headers.insert(REQUEST_ID.clone(), id.clone());
    id
}

fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len()) && id.iter().all(|b| b.is_ascii_graphic())
}

/// Reads the whole body within `limit` before the rest of the stack sees
/// the request: a slow or stalled upload costs only its own socket. A body
/// that stalls or ends early is `400`, one over the limit `413`; either way
/// the connection is closed, since the rest of the body was never read.
pub async fn read_body(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    if body.size_hint().lower() > BODY_LIMIT as u64 {
        return closing(refusal("too_large", ApiError::PayloadTooLarge(BODY_LIMIT)));
    }
    // A body already received (most are, in the packet of their head) is
    // taken without arming the timer.
    let mut collect = std::pin::pin!(Limited::new(body, BODY_LIMIT).collect());
    let read = match futures::poll!(collect.as_mut()) {
        Poll::Ready(read) => Ok(read),
        Poll::Pending => tokio::time::timeout(limit, collect).await,
    };
    let refusal = match read {
        Ok(Ok(collected)) => {
            let body = Body::from(collected.to_bytes());
            return next.run(Request::from_parts(parts, body)).await;
        }
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            refusal("too_large", ApiError::PayloadTooLarge(BODY_LIMIT))
        }
        Ok(Err(_)) => refusal(
            "incomplete",
            ApiError::InvalidRequest("the request body ended before its declared length".into()),
        ),
        Err(_) => refusal(
            "timeout",
            ApiError::InvalidRequest(format!(
                "the request body did not arrive within {} ms",
                limit.as_millis()
            )),
        ),
    };
    closing(refusal)
}

fn refusal(reason: &'static str, error: ApiError) -> Response {
    metrics::counter!("gavel_http_body_refusals_total", "reason" => reason).increment(1);
    error.into_response()
}

fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn refused(reason: &'static str) {
    metrics::counter!("gavel_http_head_refusals_total", "reason" => reason).increment(1);
}

/// Registers the edge's refusal counters at zero.
pub fn register_metrics() {
    for reason in ["timeout", "incomplete", "too_large"] {
        metrics::counter!("gavel_http_body_refusals_total", "reason" => reason).increment(0);
    }
    for reason in ["uri_too_long", "headers_too_large"] {
        metrics::counter!("gavel_http_head_refusals_total", "reason" => reason).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_echoed_only_when_short_and_visible() {
        assert!(is_valid_request_id(b"abc-123"));
        assert!(is_valid_request_id(&[b'x'; MAX_REQUEST_ID]));
        assert!(!is_valid_request_id(b""));
        assert!(!is_valid_request_id(&[b'x'; MAX_REQUEST_ID + 1]));
        assert!(!is_valid_request_id(b"two words"));
        assert!(!is_valid_request_id("caf\u{e9}".as_bytes()));
    }
}
