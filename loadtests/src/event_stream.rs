//! An event stream read straight off its own connection: the request
//! written by hand, the answer's head parsed, then the chunked body decoded
//! as it arrives. Ten thousand watchers share the machine with the service
//! they measure; this costs one task and one read per arrival, where a
//! general HTTP client would hand each chunk from a connection task to the
//! reader's.

use std::io;
use std::time::Duration;

use hyper::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::client::{Client, Failure};

/// The longest answer head read.
const MAX_HEAD: usize = 16 * 1024;
/// The room each read of the body has.
const READ_SIZE: usize = 16 * 1024;

/// An open event stream: its status, and its body to read.
pub struct EventStream {
    /// The answer's status.
    pub status: StatusCode,
    /// Its `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    connection: TcpStream,
    /// Bytes read past the head, not decoded yet.
    pending: Vec<u8>,
    body: Chunked,
}

impl EventStream {
    /// Sends `GET path` with `headers` on a connection of its own and reads
    /// the answer's head, within `deadline`.
    pub async fn open(
        client: &Client,
        path: &str,
        headers: &[(&str, &str)],
        deadline: Duration,
    ) -> Result<EventStream, Failure> {
        tokio::time::timeout(deadline, Self::exchange(client, path, headers))
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    async fn exchange(
        client: &Client,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<EventStream, Failure> {
        let mut connection = TcpStream::connect(client.addr())
            .await
            .map_err(|_| Failure::Transport)?;
        connection
            .set_nodelay(true)
            .map_err(|_| Failure::Transport)?;
        let mut request = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n", client.host());
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        (connection.write_all(request.as_bytes()).await).map_err(|_| Failure::Transport)?;
        let mut read = Vec::with_capacity(4096);
        let end = loop {
            if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if read.len() > MAX_HEAD || connection.read_buf(&mut read).await.unwrap_or(0) == 0 {
                return Err(Failure::Transport);
            }
        };
        let (status, retry_after, chunked) = head(&read[..end]).ok_or(Failure::Transport)?;
        if status == StatusCode::OK && !chunked {
            return Err(Failure::Transport);
        }
        Ok(EventStream {
            status,
            retry_after,
            connection,
            pending: read.split_off(end),
            body: Chunked::default(),
        })
    }

    /// Appends the body's next bytes to `out`; `false` once it ended.
    pub async fn read(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        if self.pending.is_empty() {
            if self.body.done {
                return Ok(false);
            }
            // Room for many events per read (a `Vec` grows by 64 bytes).
            self.pending.reserve(READ_SIZE);
            if self.connection.read_buf(&mut self.pending).await? == 0 {
                return Ok(false);
            }
        }
        self.body.decode(&self.pending, out);
        self.pending.clear();
        Ok(!self.body.done)
    }
}

/// The status, `Retry-After` and whether the body is chunked, from an
/// answer's head.
fn head(head: &[u8]) -> Option<(StatusCode, Option<u64>, bool)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let code = lines.next()?.split(' ').nth(1)?.parse::<u16>().ok()?;
    let (mut retry_after, mut chunked) = (None, false);
    for (name, value) in lines.filter_map(|line| line.split_once(':')) {
        if name.eq_ignore_ascii_case("retry-after") {
            retry_after = value.trim().parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Some((StatusCode::from_u16(code).ok()?, retry_after, chunked))
}

/// A chunked body's decoder (RFC 9112 7.1), fed bytes as they arrive.
#[derive(Debug, Default)]
struct Chunked {
    state: State,
    /// The chunk size read so far, then the bytes of the chunk still due.
    size: u64,
    done: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The chunk size's hex digits.
    #[default]
    Size,
    /// A chunk extension, up to the line's end.
    Extension,
    Data,
    /// The CRLF after a chunk's data.
    DataEnd,
}

impl Chunked {
    fn decode(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() && !self.done {
            if self.state == State::Data {
                let n = (self.size as usize).min(input.len());
                out.extend_from_slice(&input[..n]);
                input = &input[n..];
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataEnd;
                }
                continue;
            }
            let byte = input[0];
            input = &input[1..];
            match (self.state, byte) {
                (State::Size, b'\n') | (State::Extension, b'\n') => {
                    self.done = self.size == 0;
                    self.state = State::Data;
                }
                (State::Size, b';') => self.state = State::Extension,
                (State::Size, _) => {
                    if let Some(digit) = (byte as char).to_digit(16) {
                        self.size = self.size * 16 + u64::from(digit);
                    }
                }
                (State::DataEnd, b'\n') => self.state = State::Size,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_is_decoded_however_it_arrives() {
        let body = b"17\r\nevent: auction\nid: 41\n\n\r\n5;x=y\r\nhello\r\n0\r\n\r\n";
        for size in [1, 2, 3, 5, 64] {
            let mut decoder = Chunked::default();
            let mut out = Vec::new();
            for piece in body.chunks(size) {
                decoder.decode(piece, &mut out);
            }
            assert_eq!(out, b"event: auction\nid: 41\n\nhello", "pieces of {size}");
            assert!(decoder.done);
        }
    }

    #[test]
    fn the_head_gives_the_status_retry_after_and_the_framing() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(head(ok), Some((StatusCode::OK, None, true)));
        let busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\n\r\n";
        assert_eq!(
            head(busy),
            Some((StatusCode::SERVICE_UNAVAILABLE, Some(2), false))
        );
        assert_eq!(head(b"garbage\r\n\r\n"), None);
    }
}
