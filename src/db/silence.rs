//! Gives up on a database server that has gone silent (frozen, partitioned,
//! its host stopped) instead of waiting for a `statement_timeout` that such a
//! server can never fire.
//!
//! Every connection runs over [`Watched`], which counts the replies the
//! connection still owes (one `ReadyForQuery` per `Sync`, simple `Query` or
//! startup) and notes every byte the server sends on any connection in the
//! server's [`Heartbeat`]. A connection that owes a reply while its server
//! has sent nothing, on any connection, for the silence limit fails with an
//! I/O error: its callers get an error at once (a request answers 503) and
//! the pool discards it as closed. A busy but live server is never cut off
//! this way, however long a statement takes: the monitor's samples (every
//! `GAVEL_REPLICA_CHECK_MS`) and everyone else's replies keep its heartbeat
//! fresh. Silence is judged only for servers a monitor samples.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use deadpool_postgres::Connect;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};
use tokio_util::either::Either;

use crate::alarm::Alarm;

/// When one database server last sent this process anything.
pub struct Heartbeat {
    /// The server, as `host:port`, for logs.
    name: String,
    /// Nanoseconds after [`epoch`] of the last byte received.
    last_heard: AtomicU64,
    /// Monitors sampling the server; silence is judged only while one does.
    monitors: AtomicUsize,
    /// The silence limit in milliseconds, set by the monitors.
    limit_ms: AtomicU64,
    /// Whether the current silence has been logged.
    logged: AtomicBool,
}

/// Holds a [`Heartbeat`] judged while it lives (see [`Heartbeat::monitor`]).
pub struct Monitored(Arc<Heartbeat>);

impl Drop for Monitored {
    fn drop(&mut self) {
        self.0.monitors.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Heartbeat {
    /// The heartbeat of the server `config` connects to, shared by every
    /// pool of the process that connects there.
    pub fn of(config: &Config) -> Arc<Heartbeat> {
        static SERVERS: OnceLock<Mutex<HashMap<String, Arc<Heartbeat>>>> = OnceLock::new();
        let name = server_name(config);
        let mut servers = SERVERS.get_or_init(Mutex::default).lock().expect("servers");
        servers
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(Heartbeat {
                    name,
                    last_heard: AtomicU64::new(since_epoch(Instant::now())),
                    monitors: AtomicUsize::new(0),
                    limit_ms: AtomicU64::new(u64::MAX),
                    logged: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// Judges silence longer than `limit` while the returned guard lives:
    /// the caller samples the server often enough (well within `limit`)
    /// that a live server is always heard.
    pub fn monitor(self: &Arc<Self>, limit: Duration) -> Monitored {
        self.limit_ms
            .store(limit.as_millis() as u64, Ordering::Relaxed);
        self.monitors.fetch_add(1, Ordering::Relaxed);
        self.beat();
        Monitored(self.clone())
    }

    fn beat(&self) {
        self.last_heard
            .fetch_max(since_epoch(Instant::now()), Ordering::Relaxed);
        if self.logged.load(Ordering::Relaxed) {
            self.logged.store(false, Ordering::Relaxed);
            tracing::info!(server = %self.name, "database server answers again");
        }
    }

    fn last_heard(&self) -> Instant {
        epoch() + Duration::from_nanos(self.last_heard.load(Ordering::Relaxed))
    }

    /// The silence limit, while a monitor samples the server.
    fn limit(&self) -> Option<Duration> {
        (self.monitors.load(Ordering::Relaxed) > 0)
            .then(|| Duration::from_millis(self.limit_ms.load(Ordering::Relaxed)))
    }

    fn give_up(&self, limit: Duration) -> io::Error {
        metrics::counter!("gavel_db_connections_abandoned_total", "reason" => "silent")
            .increment(1);
        if !self.logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                server = %self.name,
                limit_ms = limit.as_millis() as u64,
                "database server sent nothing within the silence limit; \
                 giving up on the connections waiting for it"
            );
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the database server sent nothing for {limit:?}"),
        )
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_nanos() as u64
}

fn server_name(config: &Config) -> String {
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first() {
        Some(Host::Tcp(host)) => format!("{host}:{port}"),
        Some(Host::Unix(dir)) => format!("{}:{port}", dir.display()),
        None => format!("localhost:{port}"),
    }
}

/// Registers the abandoned-connection counter at zero.
pub fn register_metrics() {
    metrics::counter!("gavel_db_connections_abandoned_total", "reason" => "silent").increment(0);
}

/// Opens connections over [`Watched`] sockets, for deadpool.
pub struct WatchedConnect;

impl Connect for WatchedConnect {
    fn connect(
        &self,
        config: &Config,
    ) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        let config = config.clone();
        Box::pin(async move { connect(&config).await })
    }
}

/// A client whose connection runs over a [`Watched`] socket.
pub async fn connect(config: &Config) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let socket = match open_socket(config).await {
        Ok(socket) => socket,
        // The driver's own attempt reports the failure in its own terms
        // (and, should the server have come up meanwhile, connects).
        Err(_) => {
            let (client, connection) = config.connect(NoTls).await?;
            return Ok((client, tokio::spawn(drive(connection))));
        }
    };
    let watched = Watched::new(socket, Heartbeat::of(config));
    let (client, connection) = config.connect_raw(watched, NoTls).await?;
    Ok((client, tokio::spawn(drive(connection))))
}

async fn drive(connection: impl Future<Output = Result<(), tokio_postgres::Error>>) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "database connection ended");
    }
}

type Socket = Either<TcpStream, UnixStream>;

/// Connects to the first of the configured hosts that answers, as
/// tokio-postgres itself would (TCP with `TCP_NODELAY` and keepalives, or
/// the Unix socket `.s.PGSQL.{port}` in a directory).
async fn open_socket(config: &Config) -> io::Result<Socket> {
    let ports = config.get_ports();
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no host configured");
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let opened = async {
            match host {
                Host::Tcp(name) => {
                    let stream = TcpStream::connect((name.as_str(), port)).await?;
                    stream.set_nodelay(true)?;
                    if config.get_keepalives() {
                        let keepalive =
                            socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
                        socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
                    }
                    Ok(Either::Left(stream))
                }
                Host::Unix(dir) => {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    Ok(Either::Right(UnixStream::connect(path).await?))
                }
            }
        };
        let opened = match config.get_connect_timeout() {
            Some(limit) => tokio::time::timeout(*limit, opened)
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
            None => opened.await,
        };
        match opened {
            Ok(socket) => return Ok(socket),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A socket to a database server that notes what the server sends in its
/// [`Heartbeat`] and fails a read when a reply is owed and the server has
/// been silent for the limit.
pub struct Watched<S> {
    io: S,
    heartbeat: Arc<Heartbeat>,
    sent: Frames,
    received: Frames,
    /// `ReadyForQuery` messages the server still owes.
    owed: u32,
    /// When the connection last started waiting for a reply.
    waiting_since: Instant,
    /// A silence found while writing, for the next read to report.
    expired: Option<io::Error>,
    alarm: Alarm,
}

impl<S> Watched<S> {
    /// Watches `io`, a fresh connection about to send its startup message.
    pub fn new(io: S, heartbeat: Arc<Heartbeat>) -> Self {
        Watched {
            io,
            heartbeat,
            sent: Frames::untyped_first(),
            received: Frames::typed(),
            owed: 0,
            waiting_since: Instant::now(),
            expired: None,
            alarm: Alarm::default(),
        }
    }

    /// Ready with an error once the server has been silent too long while
    /// a reply is owed; otherwise arms the alarm to look again.
    fn poll_silence(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let limit = match self.heartbeat.limit() {
                Some(limit) if self.owed > 0 => limit,
                _ => {
                    self.alarm.disarm();
                    return Poll::Pending;
                }
            };
            // However long the server has been silent, a connection that has
            // just asked gets a quarter of the limit for its own reply: that
            // is how a server that resumes is heard again.
            let deadline =
                (self.heartbeat.last_heard() + limit).max(self.waiting_since + limit / 4);
            ready!(self.alarm.poll_at(deadline, cx));
            // Heard meanwhile: the deadline moved on.
            if Instant::now() >= (self.heartbeat.last_heard() + limit).max(deadline) {
                return Poll::Ready(self.heartbeat.give_up(limit));
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.expired.take() {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let received = &buf.filled()[before..];
                if !received.is_empty() {
                    this.heartbeat.beat();
                    let mut answered = 0;
                    this.received
                        .feed(received, |tag| answered += u32::from(tag == b'Z'));
                    this.owed = this.owed.saturating_sub(answered);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_silence(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        let mut asked = 0;
        this.sent.feed(&buf[..written], |tag| {
            // The startup message (untagged), `Sync` and a simple `Query`
            // each end with one `ReadyForQuery`.
            asked += u32::from(matches!(tag, STARTUP | b'S' | b'Q'));
        });
        if this.owed == 0 && asked > 0 {
            this.waiting_since = Instant::now();
        }
        this.owed += asked;
        // The driver may have polled its read before this write, while
        // nothing was owed: arm the alarm now, or nothing would wake it.
        if asked > 0 {
            if let Poll::Ready(e) = this.poll_silence(cx) {
                this.expired = Some(e);
                cx.waker().wake_by_ref();
            }
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The tag reported for the startup message, which has none.
const STARTUP: u8 = 0;

/// Splits one direction of the PostgreSQL protocol into messages (a tag
/// byte and a length that counts itself), reporting each message's tag.
#[derive(Debug)]
struct Frames {
    /// Whether the next message has a tag (only the startup has none).
    tagged: bool,
    head: [u8; 5],
    filled: usize,
    body_left: usize,
}

impl Frames {
    fn typed() -> Self {
        Frames {
            tagged: true,
            head: [0; 5],
            filled: 0,
            body_left: 0,
        }
    }

    fn untyped_first() -> Self {
        Frames {
            tagged: false,
            ..Frames::typed()
        }
    }

    fn feed(&mut self, mut bytes: &[u8], mut on_message: impl FnMut(u8)) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skipped = self.body_left.min(bytes.len());
                self.body_left -= skipped;
                bytes = &bytes[skipped..];
                continue;
            }
            let head_len = if self.tagged { 5 } else { 4 };
            let taken = (head_len - self.filled).min(bytes.len());
            self.head[self.filled..self.filled + taken].copy_from_slice(&bytes[..taken]);
            self.filled += taken;
            bytes = &bytes[taken..];
            if self.filled == head_len {
                let (tag, length) = if self.tagged {
                    (self.head[0], &self.head[1..5])
                } else {
                    (STARTUP, &self.head[0..4])
                };
                let length = u32::from_be_bytes(length.try_into().expect("four bytes"));
                self.body_left = (length as usize).saturating_sub(4);
                self.filled = 0;
                self.tagged = true;
                on_message(tag);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn messages_are_found_however_the_bytes_are_split() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&(8u32 + 3).to_be_bytes());
        stream.extend_from_slice(&196_608u32.to_be_bytes());
        stream.extend_from_slice(b"u\0\0");
        stream.extend(message(b'P', b"SELECT 1 Z S Q\0"));
        stream.extend(message(b'S', b""));
        stream.extend(message(b'Q', b"BEGIN\0"));
        for chunk in [1, 2, 3, 7, stream.len()] {
            let mut frames = Frames::untyped_first();
            let mut tags = Vec::new();
            for piece in stream.chunks(chunk) {
                frames.feed(piece, |tag| tags.push(tag));
            }
            assert_eq!(tags, vec![STARTUP, b'P', b'S', b'Q'], "chunks of {chunk}");
        }
    }

    #[tokio::test]
    async fn a_silent_server_fails_a_waiting_read_and_a_live_one_does_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let heartbeat = Arc::new(Heartbeat {
            name: "test".into(),
            last_heard: AtomicU64::new(since_epoch(Instant::now())),
            monitors: AtomicUsize::new(0),
            limit_ms: AtomicU64::new(u64::MAX),
            logged: AtomicBool::new(false),
        });
        let _monitored = heartbeat.monitor(Duration::from_millis(200));
        let (client, mut server) = tokio::io::duplex(1024);
        let mut watched = Watched::new(client, heartbeat.clone());
        watched.sent = Frames::typed();
        watched.write_all(&message(b'S', b"")).await.unwrap();

        // Heard on another connection: this one keeps waiting.
        let beats = {
            let heartbeat = heartbeat.clone();
            tokio::spawn(async move {
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    heartbeat.beat();
                }
            })
        };
        let mut byte = [0u8; 1];
        let started = Instant::now();
        let early = tokio::time::timeout(Duration::from_millis(450), watched.read(&mut byte)).await;
        assert!(early.is_err(), "a live server is waited for");
        beats.await.unwrap();

        // Then silence: the read fails about a limit after the last beat.
        let failed = watched.read(&mut byte).await.unwrap_err();
        assert_eq!(failed.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(550), "{waited:?}");
        assert!(waited < Duration::from_millis(1_500), "{waited:?}");

        // A connection that owes nothing is never failed.
        let (client, _server2) = tokio::io::duplex(1024);
        let mut idle = Watched::new(client, heartbeat);
        idle.sent = Frames::typed();
        let quiet = tokio::time::timeout(Duration::from_millis(500), idle.read(&mut byte)).await;
        assert!(quiet.is_err(), "an idle connection is left alone");
        server.write_all(b"").await.unwrap();
    }
}
