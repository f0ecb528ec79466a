//! Server-Sent Events: `GET /api/auctions/{id}/events`, an auction's live
//! view, and `GET /api/me/events`, the caller's bid changes. Both come from
//! the process's live feeds ([`crate::live`]); every stream sends a comment
//! when idle and ends at the caller's token expiry or at shutdown. Errors
//! before a stream starts are problem+json like any other answer.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use metrics::{Counter, Histogram};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::auctions::{format_server_time, AuctionView};
use super::bids::BidView;
use super::extract::{parse_id, PathId};
use super::AppState;
use crate::auth::User;
use crate::db::auctions::AuctionRecord;
use crate::error::ApiError;
use crate::live::{BidEvent, Cursor, Snapshot, Watch};

/// A comment line is sent after this long without an event.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Routes of the event streams. They stay outside the request deadline and
/// the in-flight limit: a stream is long by design and counts against
/// `GAVEL_MAX_STREAMS` instead.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/auctions/{id}/events", get(auction_events))
        .route("/api/me/events", get(my_events))
}

/// What a stream sends, one frame at a time; `None` ends the stream. Must
/// be cancel-safe: a keep-alive or the end of the stream may interrupt it.
trait Source: Send + 'static {
    fn next(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
}

/// `GET /api/auctions/{id}/events`.
async fn auction_events(
    State(state): State<AppState>,
    user: User,
    PathId(id): PathId,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "auction")?;
    let after = last_event_id(&headers, |v| v.parse::<i64>().ok(), "a version number")?;
    let watch = state
        .live
        .watch(id)
        .await?
        .ok_or(ApiError::NotFound("auction"))?;
    let expires_at = user.expires_at;
    let watcher = AuctionWatcher {
        watch,
        user,
        sent: after.unwrap_or(i64::MIN),
        resumed: after.is_some(),
        quiet_until: None,
        ended: false,
    };
    Ok(stream(watcher, expires_at, &state.shutdown, None))
}

/// `GET /api/me/events`.
async fn my_events(
    State(state): State<AppState>,
    user: User,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers, Cursor::decode, "a cursor from this stream")?;
    let slot = state.live.stream_slot()?;
    let subscription = state.bidders.subscribe(user.id.as_str()).await?;
    let backlog = match after {
        None => Vec::new(),
        Some(after) => state
            .bidders
            .since(user.id.as_str(), after, subscription.from)
            .await?
            .ok_or_else(|| {
                ApiError::InvalidRequest("Last-Event-ID names no change still kept".into())
            })?,
    };
    let changes = BidChanges {
        backlog: backlog.into(),
        live: subscription.events,
        sent: after,
    };
    Ok(stream(
        changes,
        user.expires_at,
        &state.shutdown,
        Some(slot),
    ))
}

/// `Last-Event-ID` read by `parse`; 400 naming `what` it must be.
fn last_event_id<T>(
    headers: &HeaderMap,
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Result<Option<T>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| parse(v.trim()))
        .map(Some)
        .ok_or_else(|| ApiError::InvalidRequest(format!("Last-Event-ID must be {what}")))
}

/// A `text/event-stream` response over `source`, ending at `expires_at`
/// (the token's `exp`) or `shutdown`, holding `slot` while it lasts.
fn stream(
    source: impl Source,
    expires_at: u64,
    shutdown: &CancellationToken,
    slot: Option<OwnedSemaphorePermit>,
) -> Response {
    let driver = Driver {
        source,
        last_frame: Instant::now(),
        keep_alive: Box::pin(tokio::time::sleep(KEEP_ALIVE)),
        expiry: Box::pin(tokio::time::sleep_until(token_expiry(expires_at))),
        shutdown: Box::pin(shutdown.clone().cancelled_owned()),
        done: false,
        _open: OpenStream::new(),
        _slot: slot,
    };
    let frames = futures::stream::unfold(driver, |mut driver| async move {
        let frame = driver.next().await?;
        Some((Ok::<_, Infallible>(frame), driver))
    });
    let mut response = (StatusCode::OK, Body::from_stream(frames)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Runs a [`Source`] with keep-alives, token expiry and shutdown. Its
/// timers live as long as the stream: a frame only notes its time, and the
/// keep-alive timer, when it fires, either sends a comment or is set again
/// from the last frame.
struct Driver<S> {
    source: S,
    last_frame: Instant,
    keep_alive: Pin<Box<Sleep>>,
    expiry: Pin<Box<Sleep>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
    _open: OpenStream,
    _slot: Option<OwnedSemaphorePermit>,
}

impl<S: Source> Driver<S> {
    async fn next(&mut self) -> Option<Bytes> {
        while !self.done {
            let frame = tokio::select! {
                frame = self.source.next() => frame,
                () = &mut self.keep_alive => {
                    let due = self.last_frame + KEEP_ALIVE;
                    if due > Instant::now() {
                        self.keep_alive.as_mut().reset(due);
                        continue;
                    }
                    self.keep_alive.as_mut().reset(Instant::now() + KEEP_ALIVE);
                    Some(Bytes::from_static(b": keep-alive\n\n"))
                },
                () = &mut self.expiry => None,
                () = &mut self.shutdown => None,
            };
            self.done = frame.is_none();
            self.last_frame = Instant::now();
            return frame;
        }
        None
    }
}

/// An auction stream: each newer view, at most one per pause (see
/// [`Watch::pause`]), then `end` once settled.
struct AuctionWatcher {
    watch: Watch,
    user: User,
    /// The last version sent (or the client's `Last-Event-ID`).
    sent: i64,
    /// Whether `sent` came from the client, so the first event skips no version.
    resumed: bool,
    /// No event before this (the stream's pause after its last one).
    quiet_until: Option<Instant>,
    ended: bool,
}

impl Source for AuctionWatcher {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if self.ended {
                return None;
            }
            self.paused().await;
            let latest = self.watch.views.borrow_and_update().clone();
            let closed = latest.auction.state.closed;
            if latest.version() > self.sent {
                let event = self.send(&latest);
                if closed {
                    // The final view and `end` in one write.
                    self.ended = true;
                    return Some([event, end(&latest)].concat().into());
                }
                self.quiet_until = self.watch.pause().map(|pause| Instant::now() + pause);
                return Some(event);
            }
            if closed {
                self.ended = true;
                return Some(end(&latest));
            }
            self.watch.views.changed().await.ok()?;
        }
    }
}

impl AuctionWatcher {
    /// Waits out the pause after the last event (see [`Watch::paused`]).
    /// Cancel-safe: an interrupted pause resumes.
    async fn paused(&mut self) {
        let Some(until) = self.quiet_until else {
            return;
        };
        if until > Instant::now() {
            self.watch.paused(until, self.sent).await;
        }
        self.quiet_until = None;
    }

    fn send(&mut self, latest: &Snapshot) -> Bytes {
        // Registered once: a full fan-out sends one event per stream at once.
        static SKIPPED: LazyLock<Counter> =
            LazyLock::new(|| metrics::counter!("gavel_stream_versions_skipped_total"));
        static SENT: LazyLock<Counter> =
            LazyLock::new(|| metrics::counter!("gavel_stream_events_total", "event" => "auction"));
        static DELIVERY: LazyLock<Histogram> =
            LazyLock::new(|| metrics::histogram!("gavel_stream_delivery_seconds"));
        if !self.resumed && self.sent != i64::MIN {
            SKIPPED.increment((latest.version() - self.sent - 1).max(0) as u64);
        }
        self.resumed = false;
        self.sent = latest.version();
        SENT.increment(1);
        DELIVERY.record(latest.changed_at.elapsed());
        let class = masking_class(&latest.auction, &self.user);
        let view = latest.rendered[class].get_or_init(|| render(&latest.auction, &self.user));
        // The view is rendered once per class; the time is this send's.
        let time = format_server_time(Utc::now());
        let mut event = Vec::with_capacity(view.len() + time.len() + 20);
        event.extend_from_slice(view);
        event.extend_from_slice(b",\"server_time\":\"");
        event.extend_from_slice(time.as_bytes());
        event.extend_from_slice(b"\"}\n\n");
        Bytes::from(event)
    }
}

/// The `end` event after the final view `last`.
fn end(last: &Snapshot) -> Bytes {
    metrics::counter!("gavel_stream_events_total", "event" => "end").increment(1);
    Bytes::from(format!("event: end\ndata: {}\n\n", last.version()))
}

/// Which rendering of a view `viewer` gets: the seller and admins see
/// bidders unmasked, the winner sees itself, everyone else sees masks.
fn masking_class(auction: &AuctionRecord, viewer: &User) -> usize {
    if viewer.is_admin() || viewer.id.as_str() == auction.terms.seller_id {
        1
    } else if auction.winner_id.as_deref() == Some(viewer.id.as_str()) {
        2
    } else {
        0
    }
}

/// An auction event up to the end of its view's JSON object, which each
/// send closes with its own `server_time`.
fn render(auction: &AuctionRecord, viewer: &User) -> Bytes {
    let view = AuctionView::new(auction, viewer, Utc::now());
    let json = serde_json::to_string(&view).expect("a view serializes");
    let open = json.strip_suffix('}').expect("a view is a JSON object");
    Bytes::from(format!(
        "event: auction\nid: {}\ndata: {open}",
        auction.version
    ))
}

/// A bidder's stream: what it missed (from the log), then live changes.
struct BidChanges {
    backlog: VecDeque<BidEvent>,
    live: mpsc::Receiver<BidEvent>,
    /// The last change sent: a live change at or before it was in the backlog.
    sent: Option<Cursor>,
}

impl Source for BidChanges {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            let change = match self.backlog.pop_front() {
                Some(change) => change,
                // Closed: this stream fell too far behind; the client resumes.
                None => self.live.recv().await?,
            };
            if self.sent.is_some_and(|sent| change.cursor <= sent) {
                continue;
            }
            self.sent = Some(change.cursor);
            metrics::counter!("gavel_stream_events_total", "event" => "bid").increment(1);
            let json =
                serde_json::to_string(&BidView::from(change.bid)).expect("a view serializes");
            return Some(Bytes::from(format!(
                "event: bid\nid: {}\ndata: {json}\n\n",
                change.cursor.encode()
            )));
        }
    }
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
