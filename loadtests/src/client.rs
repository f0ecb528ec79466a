//! The generator's HTTP client: keep-alive HTTP/1.1 connections to one
//! target, driven through hyper's connection API. It shares the machine
//! with the service it measures, so it does only what the generator needs:
//! pre-parsed paths and headers, a stack of idle connections (most recent
//! first) and one deadline per exchange.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, HOST};
use hyper::{HeaderMap, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A request's body.
pub type Body = Full<Bytes>;

/// A complete answer.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why an exchange has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No complete answer within the deadline.
    Timeout,
    /// The connection failed (refused, reset, closed mid-answer).
    Transport,
}

/// Keep-alive HTTP/1.1 connections to one `host:port`.
pub struct Client {
    addr: SocketAddr,
    host: HeaderValue,
    idle: Mutex<Vec<SendRequest<Body>>>,
}

impl Client {
    /// A client of the target at `base` (`http://host:port`), resolved once.
    pub async fn new(base: &str) -> anyhow::Result<Self> {
        let uri: Uri = base
            .parse()
            .with_context(|| format!("the target '{base}' is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!("the target '{base}' must be an http:// URL");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("the target '{base}' names no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await
            .with_context(|| format!("resolving the target '{base}'"))?
            .next()
            .with_context(|| format!("the target '{base}' resolves to no address"))?;
        Ok(Self {
            addr,
            host: HeaderValue::from_str(authority.as_str())?,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `request` and reads the whole answer, all within `deadline`.
    pub async fn send(
        &self,
        request: Request<Body>,
        deadline: Duration,
    ) -> Result<Response, Failure> {
        tokio::time::timeout(deadline, self.exchange(request))
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    async fn exchange(&self, mut request: Request<Body>) -> Result<Response, Failure> {
        request.headers_mut().insert(HOST, self.host.clone());
        let mut sender = self.connection().await?;
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            // The server closed an idle connection before the request went
            // out (hyper hands the request back): send it on a new one.
            Err(mut e) => match e.take_message() {
                Some(request) => {
                    sender = self.connect().await?;
                    sender
                        .send_request(request)
                        .await
                        .map_err(|_| Failure::Transport)?
                }
                None => return Err(Failure::Transport),
            },
        };
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|_| Failure::Transport)?
            .to_bytes();
        // A connection is reused only once its answer was read in full
        // (the caller's deadline drops it otherwise, and it closes).
        if !sender.is_closed() {
            self.idle.lock().expect("idle connections").push(sender);
        }
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// An idle connection that is still open, or a new one.
    async fn connection(&self) -> Result<SendRequest<Body>, Failure> {
        loop {
            let sender = self.idle.lock().expect("idle connections").pop();
            match sender {
                // Ready once its connection task has taken in the last answer.
                Some(mut sender) if !sender.is_closed() => {
                    if sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                }
                Some(_closed) => {}
                None => return self.connect().await,
            }
        }
    }

    /// The target's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The target's `host:port`, as the `Host` header says it.
    pub(crate) fn host(&self) -> &str {
        self.host.to_str().unwrap_or_default()
    }

    async fn connect(&self) -> Result<SendRequest<Body>, Failure> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|_| Failure::Transport)?;
        stream.set_nodelay(true).map_err(|_| Failure::Transport)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Transport)?;
        tokio::spawn(async move {
            // Ends when the server closes or the last sender is dropped.
            let _ = connection.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that answers each connection's first request with `204`,
    /// then closes it (without saying so); it counts the connections.
    async fn one_answer_per_connection() -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 204 No Content\r\nx-seen: 1\r\n\r\n")
                        .await;
                });
            }
        });
        (base, accepted)
    }

    fn get(path: &'static str) -> Request<Body> {
        Request::get(path).body(Body::default()).unwrap()
    }

    #[tokio::test]
    async fn a_request_on_a_connection_the_server_closed_goes_out_on_a_new_one() {
        let (base, accepted) = one_answer_per_connection().await;
        let client = Client::new(&base).await.unwrap();
        for _ in 0..3 {
            let response = client.send(get("/"), Duration::from_secs(2)).await.unwrap();
            assert_eq!(response.status, StatusCode::NO_CONTENT);
            assert_eq!(response.headers["x-seen"], "1");
            // Let the server's close reach the idle connection, or not:
            // either way the next request must be answered.
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn keep_alive_connections_are_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut accepted = 0;
            while let Ok(Ok((stream, _))) =
                tokio::time::timeout(Duration::from_millis(500), listener.accept()).await
            {
                accepted += 1;
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_request| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Body::from("ok")))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            accepted
        });
        let client = Client::new(&base).await.unwrap();
        for _ in 0..5 {
            let response = client.send(get("/"), Duration::from_secs(2)).await.unwrap();
            assert_eq!(
                (response.status, &response.body[..]),
                (StatusCode::OK, &b"ok"[..])
            );
        }
        assert_eq!(server.await.unwrap(), 1, "five requests, one connection");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_a_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let client = Client::new(&base).await.unwrap();
        let started = std::time::Instant::now();
        let failure = client
            .send(get("/"), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(failure, Failure::Timeout);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_transport_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let client = Client::new(&base).await.unwrap();
        let failure = client
            .send(get("/"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(failure, Failure::Transport);
    }

    #[tokio::test]
    async fn only_http_urls_are_targets() {
        for base in ["https://127.0.0.1:1", "not a url", "/just/a/path"] {
            assert!(Client::new(base).await.is_err(), "{base}");
        }
    }
}
