//! The watch page: one auction live in a browser, for people and for demos
//! (`gavel dev` prints its URL). Three static files embedded in the binary
//! and served outside `/api`, so loading them needs no token: the page
//! reads the auction id and the token from its URL fragment, which the
//! browser never sends to a server, and calls the API like any client (the
//! auction event stream, bids, the caller's bids).
//!
//! The page has a Content-Security-Policy of its own that allows only
//! `'self'`: no inline script or style, no other origin. The security
//! headers middleware keeps it instead of the API's `default-src 'none'`.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::error::ApiError;

/// The page's policy: its script, style and API calls come from its own
/// origin only; nothing may frame it; its form is submitted by script only.
static PAGE_CSP: HeaderValue = HeaderValue::from_static(
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
);

/// The page's files: route, content type, contents.
const FILES: [(&str, &str, &str); 3] = [
    (
        "/watch",
        "text/html; charset=utf-8",
        include_str!("watch/index.html"),
    ),
    (
        "/watch/watch.js",
        "text/javascript; charset=utf-8",
        include_str!("watch/watch.js"),
    ),
    (
        "/watch/watch.css",
        "text/css; charset=utf-8",
        include_str!("watch/watch.css"),
    ),
];

/// Routes of the watch page. Like the probes and the event streams they
/// stay outside the in-flight limit and the request deadline: they only
/// copy a few kilobytes out of the binary.
pub fn router() -> Router<AppState> {
    FILES
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            router.route(path, get(move || async move { file(content_type, body) }))
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

/// One of the page's files, with the page's policy. `no-cache`: a browser
/// asks again each time (a few kilobytes), so a new Gavel never runs with
/// an old script.
fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP.clone()),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body,
    )
        .into_response()
}
