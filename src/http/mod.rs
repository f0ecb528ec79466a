//! The HTTP layer: the public API router with its middleware (security
//! headers, request ids, metrics, body limit), the watch page, and the
//! admin router.

pub mod auctions;
pub mod bids;
pub mod consistency;
pub mod edge;
pub mod error;
pub mod events;
pub mod extract;
pub mod feed;
pub mod health;
pub mod serve;
pub mod watch;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{BoxError, ServiceBuilder};
use tracing::Instrument as _;

use crate::auth::JwtKeys;
use crate::bidding::{self, BidDesk, Door};
use crate::db::auction_cache::AuctionCache;
use crate::db::reads::Reads;
use crate::db::{Pool, Pools};
use crate::error::ApiError;
use crate::live::{BidderFeeds, LiveViews};
use crate::signals::Signals;

/// State shared by every handler: one pointer, so a request clones it
/// with a single reference-count increment.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] points to.
pub struct Shared {
    /// Connection pools on the primary.
    pub pools: Pools,
    /// Where reads go: a replica within bounds, or the primary.
    pub reads: Reads,
    /// Auction views recently read, for token-less polls.
    pub auction_views: AuctionCache,
    /// The deadline of every API request.
    pub request_timeout: Duration,
    /// Requests in flight before new ones are shed.
    pub max_in_flight: usize,
    /// How long a request's body may take to arrive.
    pub body_read_timeout: Duration,
    /// Token verification.
    pub jwt: JwtKeys,
    /// The bid path.
    pub bids: BidDesk,
    /// Wake-ups between the bid path and the resolver.
    pub signals: Signals,
    /// Reads in progress: at most a quarter of the in-flight limit, so
    /// reads waiting on a slow database cannot crowd bids out.
    pub read_slots: Arc<Semaphore>,
    /// The live auction views behind the event streams.
    pub live: LiveViews,
    /// The bidders' live bid changes behind `GET /api/me/events`.
    pub bidders: BidderFeeds,
    /// Cancelled at shutdown, which ends the event streams.
    pub shutdown: CancellationToken,
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The security headers every response carries (the API contract). The
/// policy is the API's: a JSON answer loads nothing.
static SECURITY_HEADERS: [(HeaderName, HeaderValue); 4] = [
    (
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    ),
    (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    (
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    ),
    (
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
];

/// The public API with all its middleware. API routes are bounded: a
/// request beyond the in-flight limit is shed at once and every request
/// has a deadline, both answered `503 overloaded` with `Retry-After`. A
/// body is read in full before either bound applies (see `edge.rs`).
/// Health probes stay outside those bounds so an overloaded process is
/// not mistaken for a dead one; event streams too, bounded by
/// `GAVEL_MAX_STREAMS` instead, and the watch page's static files.
pub fn api_router(state: AppState) -> Router {
    let bounds = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(overload_response))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(state.max_in_flight))
        .timeout(state.request_timeout);
    for reason in ["in_flight_limit", "deadline"] {
        metrics::counter!("gavel_http_shed_total", "reason" => reason).increment(0);
    }
    let routes = Router::new()
        .merge(auctions::router())
        .merge(bids::router())
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .layer(bounds)
        .layer(middleware::from_fn_with_state(state.clone(), admit))
        .layer(middleware::from_fn_with_state(
            state.body_read_timeout,
            edge::read_body,
        ))
        .merge(health::router())
        .merge(events::router())
        .merge(feed::router(&state))
        .merge(watch::router())
        .with_state(state);
    edge::register_metrics();
    routes.layer(middleware::from_fn(frame))
}

/// The edge of every request, in one layer: its `X-Request-Id` (see
/// [`edge::request_id`]), its span and access-log line, the limits on its
/// head, the request metrics, and on the response the security headers
/// and the request id.
async fn frame(mut request: Request, next: Next) -> Response {
    let id = edge::request_id(&mut request);
    let span = request_span(&request, &id);
    let started = Instant::now();
    let mut response = match edge::head_refusal(&request) {
        Some(refusal) => refusal,
        None => track_metrics(request, next).instrument(span.clone()).await,
    };
    span.in_scope(|| log_response(&response, started.elapsed()));
    security_headers(&mut response);
    response.headers_mut().entry(&REQUEST_ID).or_insert(id);
    response
}

/// The span every request runs in: its id (`id`), method, matched route
/// and path.
fn request_span(request: &Request, id: &HeaderValue) -> tracing::Span {
    // Visible ASCII, as `edge::request_id` makes sure.
    let request_id = id.to_str().unwrap_or("");
    let route = matched_route(request);
    tracing::info_span!(
        "request",
        request_id,
        method = %request.method(),
        route,
        path = request.uri().path(),
    )
}

/// The route template a request matched (never the raw path, which would
/// put ids in labels), or `unmatched`.
fn matched_route(request: &Request) -> &str {
    route_label(request.extensions().get::<MatchedPath>())
}

/// A matched route as a label: its template, or `unmatched`.
fn route_label(matched: Option<&MatchedPath>) -> &str {
    matched.map_or("unmatched", MatchedPath::as_str)
}

/// One access-log line per request, in the request's span: status and
/// latency. (Failures are logged with their cause where they happen.)
fn log_response(response: &Response, latency: Duration) {
    tracing::info!(
        status = response.status().as_u16(),
        latency_ms = latency.as_secs_f64() * 1000.0,
        "request finished"
    );
}

/// How long an admitted bid may wait for the database (see
/// `bidding/admission.rs`), handed from [`admit`] to the bid handler.
#[derive(Debug, Clone, Copy)]
pub struct QueueWait(pub Duration);

/// Admission at the door, before the request is authenticated or parsed:
/// refused bids and reads cost only this answer.
async fn admit(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let route = matched_route(&request);
    let door = match *request.method() {
        Method::POST if route == "/api/auctions/{id}/bids" => state.bids.admit_bid(),
        Method::GET | Method::HEAD => {
            let Ok(_slot) = state.read_slots.clone().try_acquire_owned() else {
                bidding::count_refused_read();
                return ApiError::Shed { retry_after_s: 1 }.into_response();
            };
            return match state.bids.admit_read() {
                Door::Open(_) => next.run(request).await,
                Door::Refused { retry_after_s } => ApiError::Shed { retry_after_s }.into_response(),
            };
        }
        _ => return next.run(request).await,
    };
    match door {
        Door::Open(wait) => {
            request.extensions_mut().insert(QueueWait(wait));
            next.run(request).await
        }
        Door::Refused { retry_after_s } => ApiError::Shed { retry_after_s }.into_response(),
    }
}

/// Sets the security headers on a response. A response that chose its own
/// Content-Security-Policy keeps it: only the watch page does, to load its
/// script and style from `'self'` (see `watch.rs`).
fn security_headers(response: &mut Response) {
    let headers = response.headers_mut();
    for (name, value) in &SECURITY_HEADERS {
        if name == header::CONTENT_SECURITY_POLICY && headers.contains_key(name) {
            continue;
        }
        headers.insert(name.clone(), value.clone());
    }
}

/// The answer to a request shed by the in-flight limit or cut off by its deadline.
async fn overload_response(error: BoxError) -> ApiError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("gavel_http_shed_total", "reason" => "in_flight_limit").increment(1);
        ApiError::Overloaded
    } else if error.is::<tower::timeout::error::Elapsed>() {
        metrics::counter!("gavel_http_shed_total", "reason" => "deadline").increment(1);
        tracing::warn!("a request did not finish within its deadline");
        ApiError::DeadlineExceeded
    } else {
        ApiError::Internal(anyhow::anyhow!(error))
    }
}

/// Counts requests and records latency by method, matched route and status.
async fn track_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().cloned();
    // A method of the client's own making is not a label of its own.
    let method = match *request.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let response = next.run(request).await;
    let route = route_label(route.as_ref());
    let (requests, duration) = request_metrics(method, route, response.status().as_u16());
    requests.increment(1);
    duration.record(started.elapsed().as_secs_f64());
    response
}

/// The request counter and latency histogram of a method, route and
/// status, registered at their first request: registering them by labels
/// at every request allocated and hashed the labels each time.
fn request_metrics(method: &'static str, route: &str, status: u16) -> (Counter, Histogram) {
    type Handles = HashMap<String, Vec<(&'static str, u16, Counter, Histogram)>>;
    static HANDLES: LazyLock<Mutex<Handles>> = LazyLock::new(Mutex::default);
    let mut handles = HANDLES.lock().expect("request metrics");
    if let Some(known) = handles.get(route) {
        if let Some((.., counter, histogram)) =
            (known.iter()).find(|(m, s, ..)| *m == method && *s == status)
        {
            return (counter.clone(), histogram.clone());
        }
    }
    let labels = [
        ("method", method.to_owned()),
        ("route", route.to_owned()),
        ("status", status.to_string()),
    ];
    let counter = metrics::counter!("gavel_http_requests_total", &labels);
    let histogram = metrics::histogram!("gavel_http_request_duration_seconds", &labels);
    (handles.entry(route.to_owned()).or_default()).push((
        method,
        status,
        counter.clone(),
        histogram.clone(),
    ));
    (counter, histogram)
}

/// The admin listener: Prometheus metrics, with the occupancy of `pools`
/// read at each scrape. Never exposed publicly.
pub fn admin_router(metrics: PrometheusHandle, pools: Vec<Pool>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .with_state((metrics, Arc::new(pools)))
}

async fn render_metrics(
    State((handle, pools)): State<(PrometheusHandle, Arc<Vec<Pool>>)>,
) -> impl IntoResponse {
    for pool in pools.iter() {
        pool.export_status();
    }
    crate::telemetry::collect_process_metrics();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}
