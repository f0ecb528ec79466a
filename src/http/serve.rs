//! Serves a router over HTTP/1.1 with connection hygiene: a bound on open
//! connections, a header-read timeout and an idle keep-alive timeout, so a
//! client that opens connections and sends nothing, or sends its headers a
//! byte at a time, costs only its own sockets and only for a few seconds.
//!
//! The timers live in [`Timed`], the connection's socket: a connection with
//! no request in progress must finish a request's headers within the
//! header-read timeout of their first byte (of being accepted, for a new
//! connection) and may otherwise sit idle for the idle timeout; a read past
//! that fails, and hyper closes the connection. While a request is in
//! progress (its body read, its handler run, its response sent) neither
//! timer runs: the body-read timeout and the request deadline bound it.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::Router;
use futures::task::AtomicWaker;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use uuid::Uuid;

use crate::alarm::Alarm;
use crate::config::EdgeLimits;
use crate::error::ApiError;

/// hyper's read buffer, which bounds a request head: heads larger than this
/// are answered `431` by hyper itself (Gavel's own limit is below it).
pub const MAX_READ_BUFFER: usize = 64 * 1024;
/// How long a refused connection is given to take its answer.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);

/// Serves `router` on `listener` until `shutdown`, then stops accepting and
/// waits for open connections to finish their requests.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    limits: EdgeLimits,
    shutdown: CancellationToken,
) {
    register_metrics(name);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(listener = name, error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            closed(name, "connection_limit");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Timed::new(stream, activity.clone(), limits, name));
        let connection = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_READ_BUFFER)
            .serve_connection(io, tracked(router.clone(), activity));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            let open = metrics::gauge!("gavel_http_connections_open", "listener" => name);
            open.increment(1.0);
            if let Err(e) = connection.await {
                tracing::debug!(listener = name, error = %e, "connection ended with an error");
                // Timed-out connections were counted by their timer.
                if !timed_out(&e) {
                    closed(name, if e.is_parse() { "malformed" } else { "error" });
                }
            }
            open.decrement(1.0);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The router as a hyper service that marks each request in progress on
/// the connection's [`Activity`] until its response body is done.
fn tracked(
    router: Router,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |request: Request<Incoming>| {
        let in_progress = activity.begin();
        let router = router.clone();
        async move {
            let response = router.oneshot(request.map(Body::new)).await?;
            Ok(response.map(|body| {
                Body::new(TrackedBody {
                    body,
                    _in_progress: in_progress,
                })
            }))
        }
    })
}

/// Answers a connection beyond the limit with `503 overloaded`, without
/// reading its request, and closes it.
async fn refuse(mut stream: TcpStream) {
    let response = refusal().await;
    let answered = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&response).await?;
        stream.shutdown().await?;
        // Read what the client sent meanwhile, so closing does not reset
        // the connection before it has read the answer.
        let mut sink = [0u8; 4096];
        while tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    });
    let _ = answered.await;
}

/// The bytes of a `503 overloaded` answer, in the contract's shape.
async fn refusal() -> Vec<u8> {
    let response = axum::response::IntoResponse::into_response(ApiError::Overloaded);
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("a problem body is in memory");
    let request_id = HeaderValue::from_str(&Uuid::new_v4().to_string()).expect("a uuid");
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| *name != header::CONTENT_LENGTH)
        .chain(super::SECURITY_HEADERS.iter().map(|(n, v)| (n, v)))
        .chain([(&super::REQUEST_ID, &request_id)]);
    let mut head = format!("HTTP/1.1 {}\r\nconnection: close\r\n", parts.status);
    for (name, value) in headers {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap_or("")));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Whether hyper gave up on a connection because its socket timed out.
fn timed_out(error: &hyper::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<io::Error>())
        .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut)
}

fn register_metrics(listener: &'static str) {
    for reason in [
        "header_timeout",
        "idle_timeout",
        "connection_limit",
        "malformed",
        "error",
    ] {
        metrics::counter!("gavel_http_connections_closed_total", "listener" => listener, "reason" => reason)
            .increment(0);
    }
    metrics::gauge!("gavel_http_connections_open", "listener" => listener).set(0.0);
}

fn closed(listener: &'static str, reason: &'static str) {
    metrics::counter!("gavel_http_connections_closed_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// What a connection is doing: requests in progress, how many have begun,
/// and when the last one ended.
#[derive(Default)]
struct Activity {
    in_progress: AtomicUsize,
    begun: AtomicU64,
    /// Nanoseconds after [`epoch`] when the last request ended.
    idle_since: AtomicU64,
    /// The socket's reader, woken when the last request in progress ends so
    /// that it starts the idle timer.
    reader: AtomicWaker,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InProgress {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.in_progress.fetch_add(1, Ordering::Relaxed);
        InProgress(self.clone())
    }
}

/// A request in progress; dropped with its response body.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let now = epoch().elapsed().as_nanos() as u64;
        self.0.idle_since.store(now, Ordering::Relaxed);
        if self.0.in_progress.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.reader.wake();
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A response body that keeps its request marked in progress.
struct TrackedBody {
    body: Body,
    _in_progress: InProgress,
}

impl hyper::body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client connection's socket with the header-read and idle timers.
struct Timed {
    io: TcpStream,
    activity: Arc<Activity>,
    limits: EdgeLimits,
    listener: &'static str,
    /// Whether a request head is being received: since `head_started`,
    /// while no request has begun after the `head_of`-th.
    receiving_head: bool,
    head_of: u64,
    head_started: Instant,
    alarm: Alarm,
}

impl Timed {
    fn new(
        io: TcpStream,
        activity: Arc<Activity>,
        limits: EdgeLimits,
        listener: &'static str,
    ) -> Self {
        // A new connection is on its header timer from the accept.
        Timed {
            io,
            activity,
            limits,
            listener,
            receiving_head: true,
            head_of: 0,
            head_started: Instant::now(),
            alarm: Alarm::default(),
        }
    }

    fn head_pending(&self) -> bool {
        self.receiving_head && self.activity.begun.load(Ordering::Relaxed) == self.head_of
    }

    /// When the connection must have done something by, and what it is
    /// then closed for; none while a request is in progress.
    fn deadline(&mut self) -> Option<(Instant, &'static str)> {
        if self.activity.in_progress.load(Ordering::Relaxed) > 0 {
            return None;
        }
        if self.head_pending() {
            return Some((
                self.head_started + self.limits.header_read_timeout,
                "header_timeout",
            ));
        }
        self.receiving_head = false;
        let idle_since =
            epoch() + Duration::from_nanos(self.activity.idle_since.load(Ordering::Relaxed));
        Some((idle_since + self.limits.idle_timeout, "idle_timeout"))
    }

    fn received(&mut self) {
        if self.activity.in_progress.load(Ordering::Relaxed) == 0 && !self.head_pending() {
            self.receiving_head = true;
            self.head_of = self.activity.begun.load(Ordering::Relaxed);
            self.head_started = Instant::now();
        }
    }

    /// Ready with an error once the connection's deadline has passed.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            self.activity.reader.register(cx.waker());
            let Some((deadline, reason)) = self.deadline() else {
                self.alarm.disarm();
                return Poll::Pending;
            };
            ready!(self.alarm.poll_at(deadline, cx));
            // A request may have begun meanwhile: look again.
            if self.deadline() == Some((deadline, reason)) {
                closed(self.listener, reason);
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, reason));
            }
        }
    }
}

impl AsyncRead for Timed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.received();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_expired(cx).map(Err),
        }
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
