//! Server-Sent Events: `GET /api/auctions/{id}/events`, an auction's live
//! view. The stream starts with the current view, then sends each later
//! version the process's live feed ([`crate::live`]) publishes, rendered
//! once per masking class; it ends after a settled auction's final view,
//! at the caller's token expiry, or at shutdown. Errors before the stream
//! starts are problem+json like any other answer.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::auctions::{format_server_time, AuctionView};
use super::extract::{parse_id, PathId};
use super::AppState;
use crate::auth::User;
use crate::error::ApiError;
use crate::live::{Snapshot, Watch};

/// A comment line is sent after this long without an event.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Routes of the event streams. They stay outside the request deadline and
/// the in-flight limit: a stream is long by design and counts against
/// `GAVEL_MAX_STREAMS` instead.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/auctions/{id}/events", get(auction_events))
}

/// `GET /api/auctions/{id}/events`.
async fn auction_events(
    State(state): State<AppState>,
    user: User,
    PathId(id): PathId,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "auction")?;
    let after = last_event_id(&headers)?;
    let watch = state
        .live
        .watch(id)
        .await?
        .ok_or(ApiError::NotFound("auction"))?;
    let watcher = Watcher {
        watch,
        user,
        sent: after.unwrap_or(i64::MIN),
        resumed: after.is_some(),
        ended: false,
        shutdown: state.shutdown.clone(),
        _open: OpenStream::new(),
    };
    Ok(event_stream(watcher.frames()))
}

/// `Last-Event-ID` as a version; 400 when it is not one.
fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(Some)
        .ok_or_else(|| ApiError::InvalidRequest("Last-Event-ID must be a version number".into()))
}

/// A `text/event-stream` response over `frames`.
pub fn event_stream(
    frames: impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    let mut response = (StatusCode::OK, Body::from_stream(frames)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One auction stream's state.
struct Watcher {
    watch: Watch,
    user: User,
    /// The last version sent (or the client's `Last-Event-ID`).
    sent: i64,
    /// Whether `sent` came from the client, so the first event skips no version.
    resumed: bool,
    ended: bool,
    shutdown: CancellationToken,
    _open: OpenStream,
}

impl Watcher {
    fn frames(self) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send {
        futures::stream::unfold(self, |mut watcher| async move {
            let frame = watcher.next_frame().await?;
            Some((Ok(frame), watcher))
        })
    }

    /// The next frame: a newer view, `end` after a settled one, or a
    /// keep-alive comment; `None` ends the stream.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        let expiry = token_expiry(self.user.expires_at);
        loop {
            let latest = self.watch.views.borrow_and_update().clone();
            if latest.version() > self.sent {
                return Some(self.send(&latest));
            }
            if latest.auction.state.closed {
                self.ended = true;
                metrics::counter!("gavel_stream_events_total", "event" => "end").increment(1);
                return Some(Bytes::from(format!(
                    "event: end\ndata: {}\n\n",
                    latest.version()
                )));
            }
            tokio::select! {
                changed = self.watch.views.changed() => changed.ok()?,
                () = tokio::time::sleep(KEEP_ALIVE) => return Some(Bytes::from_static(b": keep-alive\n\n")),
                () = tokio::time::sleep_until(expiry) => return None,
                () = self.shutdown.cancelled() => return None,
            }
        }
    }

    fn send(&mut self, latest: &Snapshot) -> Bytes {
        if !self.resumed && self.sent != i64::MIN {
            let skipped = (latest.version() - self.sent - 1).max(0) as u64;
            metrics::counter!("gavel_stream_versions_skipped_total").increment(skipped);
        }
        self.resumed = false;
        self.sent = latest.version();
        metrics::counter!("gavel_stream_events_total", "event" => "auction").increment(1);
        let class = masking_class(&latest.auction, &self.user);
        latest.rendered[class]
            .get_or_init(|| render(&latest.auction, &self.user))
            .clone()
    }
}

/// Which rendering of a view `viewer` gets: the seller and admins see
/// bidders unmasked, the winner sees itself, everyone else sees masks.
fn masking_class(auction: &crate::db::auctions::AuctionRecord, viewer: &User) -> usize {
    if viewer.is_admin() || viewer.id.as_str() == auction.terms.seller_id {
        1
    } else if auction.winner_id.as_deref() == Some(viewer.id.as_str()) {
        2
    } else {
        0
    }
}

#[derive(Serialize)]
struct LiveView {
    #[serde(flatten)]
    view: AuctionView,
    server_time: String,
}

fn render(auction: &crate::db::auctions::AuctionRecord, viewer: &User) -> Bytes {
    let now = Utc::now();
    let data = LiveView {
        view: AuctionView::new(auction, viewer, now),
        server_time: format_server_time(now),
    };
    let json = serde_json::to_string(&data).expect("a view serializes");
    Bytes::from(format!(
        "event: auction\nid: {}\ndata: {json}\n\n",
        auction.version
    ))
}

/// When a stream must end: at the token's `exp`.
fn token_expiry(expires_at: u64) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let left = (expires_at as f64 - now).max(0.0);
    Instant::now() + Duration::from_secs_f64(left)
}

/// Counts a stream in `gavel_streams_open` while it lives.
struct OpenStream;

impl OpenStream {
    fn new() -> Self {
        metrics::gauge!("gavel_streams_open").increment(1.0);
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!("gavel_streams_open").decrement(1.0);
    }
}
