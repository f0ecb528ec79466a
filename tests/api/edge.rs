//! Hardening at the edge: a primary that stops answering, clients that
//! hold connections open without finishing a request (slowloris, silent
//! and idle connections, stalled uploads), a bound on open connections,
//! and malformed requests on the wire. Everything here is real: a private
//! PostgreSQL frozen with SIGSTOP, raw TCP sockets on loopback, and every
//! wait bounded so a server that does not defend itself fails the test
//! instead of hanging it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::helpers::*;

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 on a socket
// ---------------------------------------------------------------------------

/// A response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Lower-cased names, in the order received.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The problem `code`, or "" when the body is not a problem.
    fn code(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// One complete response at the start of `buf`, and how many bytes it
/// took; `None` while more bytes are needed. `eof`: no more bytes will come
/// (a response without a length then ends here).
fn parse_response(buf: &[u8], eof: bool) -> Option<(RawResponse, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end - 4]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let rest = &buf[head_end..];
    let bodiless = status < 200 || status == 204 || status == 304;
    let (body, used) = if bodiless {
        (Vec::new(), 0)
    } else if find("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = rest[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size_text = String::from_utf8_lossy(&rest[at..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                // No trailers are expected: the final CRLF.
                if rest.len() < at + 2 {
                    return None;
                }
                at += 2;
                break;
            }
            if rest.len() < at + size + 2 {
                return None;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
        (body, at)
    } else if let Some(length) = find("content-length") {
        let length: usize = length.parse().ok()?;
        if rest.len() < length {
            return None;
        }
        (rest[..length].to_vec(), length)
    } else if eof {
        (rest.to_vec(), rest.len())
    } else {
        return None;
    };
    Some((
        RawResponse {
            status,
            headers,
            body,
        },
        head_end + used,
    ))
}

/// A client connection that speaks HTTP/1.1 by hand. Its write half may be
/// handed to a background writer (for a request larger than the socket
/// buffers, which the server may refuse before reading it all).
struct RawConn {
    read: OwnedReadHalf,
    write: Option<OwnedWriteHalf>,
    writer: Option<JoinHandle<OwnedWriteHalf>>,
    buf: Vec<u8>,
    eof: bool,
}

impl RawConn {
    async fn open(addr: SocketAddr) -> Result<RawConn, String> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).ok();
        let (read, write) = stream.into_split();
        Ok(RawConn {
            read,
            write: Some(write),
            writer: None,
            buf: Vec::new(),
            eof: false,
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write
            .as_mut()
            .expect("the write half is not handed away")
            .write_all(bytes)
            .await
    }

    /// Writes `bytes` from a task of its own, so the answer can be read while
    /// the server refuses to read the rest. The write half stays open (no
    /// FIN) until the connection is dropped.
    fn send_in_background(&mut self, bytes: Vec<u8>) {
        let mut write = self
            .write
            .take()
            .expect("the write half is not handed away");
        self.writer = Some(tokio::spawn(async move {
            let _ = write.write_all(&bytes).await;
            write
        }));
    }

    /// Half-closes the connection: the server reads EOF after what was sent.
    async fn shutdown_write(&mut self) {
        let _ = self
            .write
            .as_mut()
            .expect("the write half is not handed away")
            .shutdown()
            .await;
    }

    /// Reads more bytes, waiting until `deadline`; false when nothing came.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, self.read.read(&mut chunk)).await {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                true
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads one whole response within `limit`.
    async fn read_response(&mut self, limit: Duration) -> Result<RawResponse, String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some((response, used)) = parse_response(&self.buf, self.eof) {
                self.buf.drain(..used);
                return Ok(response);
            }
            if self.eof {
                return Err(format!(
                    "the connection ended before a whole response ({} bytes: {:?})",
                    self.buf.len(),
                    String::from_utf8_lossy(&self.buf[..self.buf.len().min(200)])
                ));
            }
            if !self.fill(deadline).await {
                return Err(format!(
                    "no whole response within {limit:?} ({} bytes so far)",
                    self.buf.len()
                ));
            }
        }
    }

    /// Waits until the server closes the connection (EOF or a reset);
    /// returns when, or `None` when it is still open after `limit`. Bytes
    /// that arrive meanwhile (an unsolicited `408`, say) are ignored.
    async fn closed_within(&mut self, limit: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.eof {
            if !self.fill(deadline).await {
                return None;
            }
        }
        Some(Instant::now())
    }
}

/// The headers Gavel puts on every response (the API contract's conventions).
fn assert_gavel_headers(what: &str, response: &RawResponse) {
    let header = |name: &str| {
        response
            .header(name)
            .unwrap_or_else(|| panic!("{what}: missing {name} in {:?}", response.headers))
            .to_owned()
    };
    assert_contract_headers(what, header);
}

/// Asserts a Gavel problem: the status, problem+json, the contract's
/// headers, and (when given) the `code`.
fn assert_raw_problem(what: &str, response: &RawResponse, status: u16, code: Option<&str>) {
    assert_eq!(
        response.status,
        status,
        "{what}: status (body {})",
        String::from_utf8_lossy(&response.body)
    );
    assert_gavel_headers(what, response);
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json"),
        "{what}: content type"
    );
    let problem = response.json();
    assert_eq!(problem["status"], json!(status), "{what}: {problem}");
    assert!(
        problem["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{what}: a code: {problem}"
    );
    if let Some(code) = code {
        assert_eq!(problem["code"], code, "{what}: {problem}");
    }
}

/// `POST /api/auctions/{id}/bids` headers announcing a 64-byte body, then
/// the first 11 bytes of it.
fn truncated_bid(addr: SocketAddr, auction_id: &str, token: &str) -> Vec<u8> {
    let partial = br#"{"amount": "#;
    assert_eq!(partial.len(), 11);
    let mut request = format!(
        "POST /api/auctions/{auction_id}/bids HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {token}\r\nIdempotency-Key: {}\r\n\
         Content-Type: application/json\r\nContent-Length: 64\r\n\r\n",
        new_key()
    )
    .into_bytes();
    request.extend_from_slice(partial);
    request
}

const GET_HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: gavel\r\n\r\n";

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// The `q` quantile (0..=1) of `values`, nearest rank.
fn quantile(values: &[Duration], q: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn describe(values: &[Duration]) -> String {
    if values.is_empty() {
        return "none".to_owned();
    }
    format!(
        "n={} p50={:?} p99={:?} max={:?}",
        values.len(),
        quantile(values, 0.5),
        quantile(values, 0.99),
        quantile(values, 1.0)
    )
}

/// A request's answer and how long it took (body included).
struct Timed {
    took: Duration,
    outcome: Result<(StatusCode, HeaderMap, String), String>,
}

impl Timed {
    fn status(&self) -> Option<StatusCode> {
        self.outcome.as_ref().ok().map(|(s, _, _)| *s)
    }
}

async fn send_timed(request: reqwest::RequestBuilder) -> Timed {
    let started = Instant::now();
    let outcome = async {
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.text().await.map_err(|e| e.to_string())?;
        Ok((status, headers, body))
    }
    .await;
    Timed {
        took: started.elapsed(),
        outcome,
    }
}

/// Legitimate bids alongside an attack: one lane per auction in
/// `auction_ids`, each placing `per_lane` bids `gap` apart from bidders of
/// its own, each bid above the last one's price, so none can be refused as
/// too low. On a client of its own (no connection pooled before the
/// attack). Returns every bid's answer.
fn spawn_legit_bids(
    app: &TestApp,
    auction_ids: &[String],
    per_lane: usize,
    gap: Duration,
) -> JoinHandle<Vec<Timed>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(auction_ids.len())
        .build()
        .unwrap();
    let addr = app.addr;
    let lanes: Vec<(String, Vec<String>)> = auction_ids
        .iter()
        .enumerate()
        .map(|(lane, id)| {
            let tokens = (0..per_lane)
                .map(|k| app.token(&format!("lane{lane}-bidder{k}"), &[]))
                .collect();
            (id.clone(), tokens)
        })
        .collect();
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let lanes: Vec<JoinHandle<Vec<Timed>>> = lanes
            .into_iter()
            .map(|(auction_id, tokens)| {
                let http = http.clone();
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    for (k, token) in tokens.iter().enumerate() {
                        tokio::time::sleep_until(start + gap * k as u32).await;
                        let request = http
                            .post(format!("http://{addr}/api/auctions/{auction_id}/bids"))
                            .bearer_auth(token)
                            .header("Idempotency-Key", new_key())
                            .json(&json!({ "amount": 1_000 + 1_000 * k as i64 }));
                        answers.push(send_timed(request).await);
                    }
                    answers
                })
            })
            .collect();
        let mut all = Vec::new();
        for lane in lanes {
            all.extend(lane.await.unwrap());
        }
        all
    })
}

/// Asserts every legitimate bid was accepted, with a p99 under `p99_limit`.
fn assert_legit_bids(what: &str, answers: &[Timed], p99_limit: Duration) {
    let refused: Vec<String> = answers
        .iter()
        .filter(|a| !a.status().is_some_and(|s| s.is_success()))
        .map(|a| match &a.outcome {
            Ok((status, _, body)) => format!("{status} after {:?}: {body}", a.took),
            Err(e) => format!("error after {:?}: {e}", a.took),
        })
        .collect();
    let latencies: Vec<Duration> = answers.iter().map(|a| a.took).collect();
    eprintln!("{what}: legitimate bids {}", describe(&latencies));
    assert!(
        refused.is_empty(),
        "{what}: {} of {} legitimate bids not accepted, e.g. {:?}",
        refused.len(),
        answers.len(),
        &refused[..refused.len().min(5)]
    );
    let p99 = quantile(&latencies, 0.99);
    assert!(
        p99 < p99_limit,
        "{what}: legitimate bids p99 {p99:?} (limit {p99_limit:?})"
    );
}

/// Asserts every connection's measured time is within `limit`.
fn assert_all_within(what: &str, results: &[Result<Duration, String>], limit: Duration) {
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let times: Vec<Duration> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    eprintln!(
        "{what}: {} of {} closed, {}",
        times.len(),
        results.len(),
        describe(&times)
    );
    assert!(
        failures.is_empty(),
        "{what}: {} of {} failed, e.g. {:?}",
        failures.len(),
        results.len(),
        &failures[..failures.len().min(5)]
    );
    let slowest = quantile(&times, 1.0);
    assert!(
        slowest <= limit,
        "{what}: slowest {slowest:?}, limit {limit:?}"
    );
}

async fn join_all<T>(handles: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut all = Vec::with_capacity(handles.len());
    for handle in handles {
        all.push(handle.await.unwrap());
    }
    all
}

// ---------------------------------------------------------------------------
// 1. A frozen primary
// ---------------------------------------------------------------------------

/// `pid`'s parent and state from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Every process descending from `root` (not `root` itself).
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, _)) = proc_stat(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            found.push(child);
            queue.push(child);
        }
    }
    found
}

/// Sends `signal` (`STOP`, `CONT`) to `pids`; a process that has exited
/// meanwhile is no error.
fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-s")
        .arg(signal)
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run kill");
}

/// A PostgreSQL server stopped dead: the postmaster and every process it
/// forked get SIGSTOP, so connections stay open and silent (the kernel still
/// accepts connections and data, nobody answers). Resumed with SIGCONT when
/// dropped, so a failing test never leaves a frozen cluster behind.
struct Freeze {
    root: u32,
    pids: Vec<u32>,
}

impl Freeze {
    fn new(postmaster: u32) -> Freeze {
        signal(&[postmaster], "STOP");
        let mut freeze = Freeze {
            root: postmaster,
            pids: vec![postmaster],
        };
        // The postmaster, stopped, forks no more; look again for a child
        // that was being forked when it stopped.
        for _ in 0..3 {
            let new: Vec<u32> = descendants(postmaster)
                .into_iter()
                .filter(|p| !freeze.pids.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            signal(&new, "STOP");
            freeze.pids.extend(new);
        }
        freeze
    }

    /// Waits until every process is in the stopped state; returns how many.
    fn wait_stopped(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let running: Vec<(u32, char)> = self
                .pids
                .iter()
                .filter_map(|&p| proc_stat(p).map(|(_, state)| (p, state)))
                .filter(|(_, state)| *state != 'T' && *state != 't')
                .collect();
            if running.is_empty() {
                return self.pids.len();
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL processes not stopped: {running:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn thaw(&mut self) {
        if self.pids.is_empty() {
            return;
        }
        let mut all = descendants(self.root);
        all.append(&mut self.pids);
        all.sort_unstable();
        all.dedup();
        signal(&all, "CONT");
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// A bid sent while the primary was frozen, retried afterwards as is.
#[derive(Clone)]
struct FrozenBid {
    bidder: String,
    token: String,
    auction_id: String,
    amount: i64,
    key: String,
}

impl FrozenBid {
    fn request(&self, http: &reqwest::Client, addr: SocketAddr) -> reqwest::RequestBuilder {
        http.post(format!(
            "http://{addr}/api/auctions/{}/bids",
            self.auction_id
        ))
        .bearer_auth(&self.token)
        .header("Idempotency-Key", &self.key)
        .json(&json!({ "amount": self.amount }))
        // Bounded well past the limit under test, so a hang fails, not stalls.
        .timeout(Duration::from_secs(4))
    }
}

/// Sends `bid` after the thaw: its answer, which must be a 2xx or a `503`
/// (`None` when the request itself failed, say on a pooled connection
/// the server had closed).
async fn accepted_or_503(
    bid: &FrozenBid,
    app: &TestApp,
) -> Option<(StatusCode, HeaderMap, String)> {
    let timed = send_timed(bid.request(&app.http, app.addr)).await;
    let (status, headers, body) = timed.outcome.ok()?;
    assert!(
        status.is_success() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{} after the thaw: {status} {body}",
        bid.bidder
    );
    Some((status, headers, body))
}

/// One answer while the primary was frozen.
struct FrozenAnswer {
    /// The bid, or `None` for a read.
    bid: Option<FrozenBid>,
    /// When it was sent, after the freeze began.
    sent: Duration,
    timed: Timed,
}

/// Checks an answer given while the primary was silent: within `limit`,
/// and `503` with `Retry-After` and `unavailable` / `overloaded` (a read
/// may also be served, from memory, `200`). Says what is wrong, if anything.
fn check_frozen_answer(answer: &FrozenAnswer, limit: Duration) -> Result<(), String> {
    let what = match &answer.bid {
        Some(bid) => format!("{} (sent {:?} into the freeze)", bid.bidder, answer.sent),
        None => format!("a read (sent {:?} into the freeze)", answer.sent),
    };
    let took = answer.timed.took;
    let (status, headers, body) = match &answer.timed.outcome {
        Ok(ok) => ok,
        Err(e) => return Err(format!("{what}: no answer after {took:?}: {e}")),
    };
    if took >= limit {
        return Err(format!("{what}: answered {status} after {took:?}"));
    }
    if answer.bid.is_none() && *status == StatusCode::OK {
        return Ok(());
    }
    let code = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|p| p["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let problem_json = headers.get("content-type").and_then(|v| v.to_str().ok())
        == Some("application/problem+json");
    if *status != StatusCode::SERVICE_UNAVAILABLE
        || !headers.contains_key("retry-after")
        || !problem_json
        || !(code == "unavailable" || code == "overloaded")
    {
        // A bid cannot be acknowledged: nothing can commit.
        return Err(format!(
            "{what}: {status} (Retry-After: {:?}) {body}",
            headers.get("retry-after")
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_answered_503_within_a_second_and_loses_no_bid() {
    /// Default timeouts: the silence limit is max(pool wait, 2 x replica
    /// check) = 1 s; an answer may take that plus scheduling slack.
    const ANSWER_LIMIT: Duration = Duration::from_millis(1_500);
    const FROZEN_BIDS_MAX: usize = 40;

    let primary = start_private_primary().await;
    let database_url = primary.url("gavel");
    let app = TestApp::spawn_on(&database_url, |_| {}).await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    // Each bid sent during the freeze goes to an auction of its own: a bid
    // that committed late (its statement reached the frozen server before
    // Gavel gave up on it) can then never make the retry of another one
    // too low to accept.
    let mut frozen_auctions = Vec::new();
    for _ in 0..FROZEN_BIDS_MAX {
        let created = app.create_auction("seller", json!({})).await;
        frozen_auctions.push(created["id"].as_str().unwrap().to_owned());
    }

    // Warm up: pools open, caches filled, bids resolved.
    let mut warm_ids = Vec::new();
    for (i, amount) in [1_000, 2_000, 3_000].into_iter().enumerate() {
        let bid = app
            .bid_resolved(&format!("warm-{i}"), &auction_id, amount)
            .await;
        warm_ids.push(id_of(&bid));
    }
    for _ in 0..3 {
        app.auction(&auction_id).await;
    }
    let abandoned_before = Scrape::take(&app).await.sum(
        "gavel_db_connections_abandoned_total",
        &[("reason", "silent")],
    );

    // Freeze.
    let postmaster = primary.postmaster_pid().expect("the primary runs");
    let mut freeze = Freeze::new(postmaster);
    let frozen_at = Instant::now();
    let processes = freeze.wait_stopped();
    eprintln!("frozen primary: {processes} PostgreSQL processes stopped");

    let reader = app.token("reader", &[]);
    let read_url = app.url(&format!("/api/auctions/{auction_id}"));
    let mut next_bid = 0usize;
    let mut new_bid = || {
        let n = next_bid;
        next_bid += 1;
        frozen_auctions.get(n).map(|auction_id| FrozenBid {
            bidder: format!("frozen-{n}"),
            token: app.token(&format!("frozen-{n}"), &[]),
            auction_id: auction_id.clone(),
            amount: 5_000,
            key: new_key(),
        })
    };
    let spawn_bid = |bid: FrozenBid| {
        let http = app.http.clone();
        let addr = app.addr;
        tokio::spawn(async move {
            let sent = frozen_at.elapsed();
            let timed = send_timed(bid.request(&http, addr)).await;
            FrozenAnswer {
                bid: Some(bid),
                sent,
                timed,
            }
        })
    };
    let spawn_read = || {
        let request = app
            .http
            .get(&read_url)
            .bearer_auth(&reader)
            .timeout(Duration::from_secs(4));
        tokio::spawn(async move {
            let sent = frozen_at.elapsed();
            FrozenAnswer {
                bid: None,
                sent,
                timed: send_timed(request).await,
            }
        })
    };
    // Concurrent bursts (at once, and once Gavel knows the server is
    // silent) and a sequential client in between (a bid and a read every
    // 150 ms at most), for about 4 s in all.
    let mut handles = Vec::new();
    let mut answers = Vec::new();
    let mut bursts = 0;
    loop {
        if bursts == 0 || (bursts == 1 && frozen_at.elapsed() >= Duration::from_secs(2)) {
            bursts += 1;
            for _ in 0..6 {
                if let Some(bid) = new_bid() {
                    handles.push(spawn_bid(bid));
                }
            }
            for _ in 0..4 {
                handles.push(spawn_read());
            }
        }
        if frozen_at.elapsed() >= Duration::from_millis(3_300) {
            break;
        }
        let pace = tokio::time::sleep(Duration::from_millis(150));
        if let Some(bid) = new_bid() {
            answers.push(spawn_bid(bid).await.unwrap());
        }
        answers.push(spawn_read().await.unwrap());
        pace.await;
    }
    answers.extend(join_all(handles).await);
    let held = frozen_at.elapsed();
    freeze.thaw();
    let thawed_at = Instant::now();

    let bids: Vec<&FrozenAnswer> = answers.iter().filter(|a| a.bid.is_some()).collect();
    let reads: Vec<&FrozenAnswer> = answers.iter().filter(|a| a.bid.is_none()).collect();
    for (what, list) in [("bids", &bids), ("reads", &reads)] {
        let mut outcomes: HashMap<String, usize> = HashMap::new();
        for answer in list.iter() {
            let outcome = match &answer.timed.outcome {
                Ok((status, _, body)) => {
                    let code = serde_json::from_str::<Value>(body)
                        .ok()
                        .and_then(|p| p["code"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    format!("{} {code}", status.as_u16()).trim_end().to_owned()
                }
                Err(_) => "no answer".to_owned(),
            };
            *outcomes.entry(outcome).or_default() += 1;
        }
        let times: Vec<Duration> = list.iter().map(|a| a.timed.took).collect();
        eprintln!(
            "frozen primary ({held:?}): {what} {outcomes:?}, {}",
            describe(&times)
        );
    }
    let wrong: Vec<String> = answers
        .iter()
        .filter_map(|a| check_frozen_answer(a, ANSWER_LIMIT).err())
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} answers while the primary was frozen are not a prompt 503: {wrong:#?}",
        wrong.len(),
        answers.len()
    );
    assert!(bids.len() >= 10, "bids sent while frozen: {}", bids.len());
    assert!(reads.len() >= 8, "reads sent while frozen: {}", reads.len());

    // Back: a new bid is accepted and reads work within a few seconds.
    let probe = FrozenBid {
        bidder: "probe".to_owned(),
        token: app.token("probe", &[]),
        auction_id: auction_id.clone(),
        amount: 10_000_000,
        key: new_key(),
    };
    let probe_refusals = std::cell::Cell::new(0);
    let probe: Value = eventually(
        Duration::from_secs(10),
        "a new bid to be accepted after the thaw",
        || async {
            let (status, _, body) = accepted_or_503(&probe, &app).await?;
            if status.is_success() {
                return Some(serde_json::from_str(&body).unwrap());
            }
            probe_refusals.set(probe_refusals.get() + 1);
            None
        },
    )
    .await;
    let probe_refusals = probe_refusals.get();
    let recovered = thawed_at.elapsed();
    eventually(Duration::from_secs(10), "reads after the thaw", || async {
        let response = app
            .get_as(&format!("/api/auctions/{auction_id}"), "reader", &[])
            .await;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    eprintln!(
        "frozen primary: first new bid accepted {recovered:?} after SIGCONT \
         ({probe_refusals} 503s before)"
    );

    // Each bid refused during the freeze, retried with its key, is
    // accepted once: new, or replayed when its statement committed late.
    let mut retried = Vec::new();
    let mut replays = 0;
    for answer in &bids {
        let bid = answer.bid.as_ref().unwrap();
        let (view, replayed) = eventually(
            Duration::from_secs(10),
            "a frozen bid's retry to be accepted",
            || async {
                let (status, headers, body) = accepted_or_503(bid, &app).await?;
                status.is_success().then(|| {
                    let replayed = headers
                        .get("idempotent-replayed")
                        .is_some_and(|v| v.as_bytes() == b"true");
                    (serde_json::from_str::<Value>(&body).unwrap(), replayed)
                })
            },
        )
        .await;
        assert_eq!(view["amount"], bid.amount, "retry of {}: {view}", bid.key);
        replays += usize::from(replayed);
        retried.push((bid.clone(), id_of(&view)));
    }
    eprintln!(
        "frozen primary: {} frozen bids retried, all accepted ({replays} replays of a late commit)",
        retried.len()
    );

    // Metrics: connections to the silent server were given up on.
    let abandoned = eventually(
        Duration::from_secs(5),
        "gavel_db_connections_abandoned_total{reason=\"silent\"} to count",
        || async {
            let now = Scrape::take(&app).await.sum(
                "gavel_db_connections_abandoned_total",
                &[("reason", "silent")],
            );
            (now > abandoned_before).then_some(now - abandoned_before)
        },
    )
    .await;
    eprintln!("frozen primary: {abandoned} connections abandoned as silent");

    // Nothing acknowledged lost or doubled; every bid resolved consistently.
    let db = connect(&database_url).await;
    for (bid, id) in &retried {
        let auction_uuid: Uuid = bid.auction_id.parse().unwrap();
        wait_resolved(&db, auction_uuid, Duration::from_secs(15)).await;
        let logged = assert_consistent(&db, auction_uuid).await;
        let ids: Vec<Uuid> = logged.iter().map(|b| b.id).collect();
        assert_eq!(ids, [*id], "{}: its one bid, once", bid.bidder);
    }
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    wait_resolved(&db, auction_uuid, Duration::from_secs(15)).await;
    let logged = assert_consistent(&db, auction_uuid).await;
    let mut expected: Vec<Uuid> = warm_ids.clone();
    expected.push(id_of(&probe));
    let mut ids: Vec<Uuid> = logged.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    expected.sort_unstable();
    assert_eq!(ids, expected, "warm-up bids and the probe, each once");
    app.stop().await;
    drop(freeze);
    drop(primary);
}

// ---------------------------------------------------------------------------
// 2. Slowloris, silent and idle connections
// ---------------------------------------------------------------------------

/// A slowloris client: a valid request line, then one header byte every
/// `drip`. Returns how long after its first byte the server closed it.
async fn slowloris(
    addr: SocketAddr,
    drip: Duration,
    give_up: Duration,
) -> Result<Duration, String> {
    let mut conn = RawConn::open(addr).await?;
    conn.send(b"GET /healthz HTTP/1.1\r\n")
        .await
        .map_err(|e| format!("request line: {e}"))?;
    let first_byte = Instant::now();
    let mut write = conn.write.take().unwrap();
    let drip_task = tokio::spawn(async move {
        let header = b"Host: gavel\r\nX-Slow: ";
        for i in 0.. {
            tokio::time::sleep(drip).await;
            let byte = header.get(i).copied().unwrap_or(b'a');
            if write.write_all(&[byte]).await.is_err() {
                break;
            }
        }
        write
    });
    let closed = conn.closed_within(give_up).await;
    drip_task.abort();
    match closed {
        Some(at) => Ok(at - first_byte),
        None => Err(format!("still open {give_up:?} after its first byte")),
    }
}

/// A connection that sends nothing; how long after connecting it was closed.
async fn silent(addr: SocketAddr, give_up: Duration) -> Result<Duration, String> {
    let mut conn = RawConn::open(addr).await?;
    let connected = Instant::now();
    match conn.closed_within(give_up).await {
        Some(at) => Ok(at - connected),
        None => Err(format!("still open {give_up:?} after connecting")),
    }
}

/// A connection that completes one request with keep-alive, then sits
/// idle; with `reuse_after`, it sends a second request that long after the
/// first answer (which must still be served). Returns how long after its
/// last answer the server closed it.
async fn kept_alive(
    addr: SocketAddr,
    reuse_after: Option<Duration>,
    give_up: Duration,
) -> Result<Duration, String> {
    let mut conn = RawConn::open(addr).await?;
    conn.send(GET_HEALTHZ).await.map_err(|e| e.to_string())?;
    let first = conn.read_response(Duration::from_secs(5)).await?;
    let mut answered = Instant::now();
    if first.status != 200 {
        return Err(format!("GET /healthz answered {}", first.status));
    }
    if let Some(after) = reuse_after {
        tokio::time::sleep_until((answered + after).into()).await;
        conn.send(GET_HEALTHZ)
            .await
            .map_err(|e| format!("reuse after {after:?}: {e}"))?;
        let second = conn
            .read_response(Duration::from_secs(5))
            .await
            .map_err(|e| format!("reuse after {after:?}: {e}"))?;
        if second.status != 200 {
            return Err(format!("reuse after {after:?}: answered {}", second.status));
        }
        answered = Instant::now();
    }
    match conn.closed_within(give_up).await {
        Some(at) => Ok(at - answered),
        None => Err(format!("still open {give_up:?} after its answer")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_silent_and_idle_connections_are_closed_on_time_while_bids_flow() {
    const HEADER_READ: Duration = Duration::from_secs(1);
    const IDLE: Duration = Duration::from_secs(2);
    const SLACK: Duration = Duration::from_secs(1);
    const GIVE_UP: Duration = Duration::from_secs(5);
    let app = TestApp::spawn_with(|config| {
        config.limits.edge.header_read_timeout = HEADER_READ;
        config.limits.edge.idle_timeout = IDLE;
        config.limits.edge.body_read_timeout = Duration::from_secs(1);
        config.limits.max_in_flight = 64;
    })
    .await;
    let mut lanes = Vec::new();
    for _ in 0..20 {
        let auction = app.create_auction("seller", json!({})).await;
        lanes.push(auction["id"].as_str().unwrap().to_owned());
    }
    let addr = app.addr;

    // 300 legitimate bids over 3 s, while the connections below are opened
    // (spread over about 0.6 s) and held.
    let legit = spawn_legit_bids(&app, &lanes, 15, Duration::from_millis(200));
    let spread = |i: usize, step_ms: u64| Duration::from_millis(i as u64 * step_ms);
    let slow: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                tokio::time::sleep(spread(i, 3)).await;
                slowloris(addr, Duration::from_millis(300), GIVE_UP).await
            })
        })
        .collect();
    let quiet: Vec<_> = (0..300)
        .map(|i| {
            tokio::spawn(async move {
                tokio::time::sleep(spread(i, 2)).await;
                silent(addr, GIVE_UP).await
            })
        })
        .collect();
    // A tenth of the kept-alive connections come back after 1.3 s: past
    // the header-read timeout, within the idle timeout, so still served.
    let reuse_after = Duration::from_millis(1_300);
    let idle: Vec<_> = (0..100)
        .map(|i| {
            tokio::spawn(async move {
                tokio::time::sleep(spread(i, 6)).await;
                let reuse = (i % 10 == 0).then_some(reuse_after);
                (reuse.is_some(), kept_alive(addr, reuse, GIVE_UP).await)
            })
        })
        .collect();

    let slow = join_all(slow).await;
    let quiet = join_all(quiet).await;
    let idle = join_all(idle).await;
    let legit = legit.await.unwrap();

    assert_all_within(
        "slowloris: closed after its first byte",
        &slow,
        HEADER_READ + SLACK,
    );
    assert_all_within(
        "silent connection: closed after connecting",
        &quiet,
        HEADER_READ + SLACK,
    );
    let (reused, once): (Vec<_>, Vec<_>) = idle.into_iter().partition(|(reused, _)| *reused);
    let once: Vec<_> = once.into_iter().map(|(_, r)| r).collect();
    let reused: Vec<_> = reused.into_iter().map(|(_, r)| r).collect();
    assert_all_within(
        "kept-alive connection: closed after its answer",
        &once,
        IDLE + SLACK,
    );
    assert_all_within(
        &format!(
            "kept-alive connection reused after {reuse_after:?}: closed after its second answer"
        ),
        &reused,
        IDLE + SLACK,
    );
    assert_legit_bids("slowloris", &legit, Duration::from_secs(1));
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 3. Stalled uploads
// ---------------------------------------------------------------------------

/// An upload that stalls: its headers and 11 of 64 body bytes. Returns
/// the answer, how long after sending it came, and how long after the
/// answer the connection was closed.
async fn stalled_upload(
    addr: SocketAddr,
    request: Vec<u8>,
    give_up: Duration,
) -> Result<(RawResponse, Duration, Duration), String> {
    let mut conn = RawConn::open(addr).await?;
    conn.send(&request).await.map_err(|e| e.to_string())?;
    let sent = Instant::now();
    let response = conn.read_response(give_up).await?;
    let answered = Instant::now();
    let closed = conn.closed_within(give_up).await.ok_or_else(|| {
        format!(
            "answered {} but still open {give_up:?} later",
            response.status
        )
    })?;
    Ok((response, answered - sent, closed - answered))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_are_answered_400_and_hold_no_in_flight_slot() {
    const BODY_READ: Duration = Duration::from_secs(1);
    const SLACK: Duration = Duration::from_secs(1);
    let app = TestApp::spawn_with(|config| {
        config.limits.max_in_flight = 64;
        config.limits.edge.body_read_timeout = BODY_READ;
    })
    .await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let mut lanes = Vec::new();
    for _ in 0..20 {
        let auction = app.create_auction("seller", json!({})).await;
        lanes.push(auction["id"].as_str().unwrap().to_owned());
    }

    // 300 stalled uploads, more than the 64 in-flight places, opened over
    // about 0.9 s, and 300 legitimate bids over 3 s alongside.
    let legit = spawn_legit_bids(&app, &lanes, 15, Duration::from_millis(200));
    let stalls: Vec<_> = (0..300)
        .map(|i| {
            let request = truncated_bid(
                app.addr,
                &auction_id,
                &app.token(&format!("staller-{i}"), &[]),
            );
            let addr = app.addr;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(i * 3)).await;
                stalled_upload(addr, request, Duration::from_secs(5)).await
            })
        })
        .collect();
    let stalls = join_all(stalls).await;
    let legit = legit.await.unwrap();

    let mut answered = Vec::new();
    let mut closed = Vec::new();
    let mut failures = Vec::new();
    for (i, stall) in stalls.iter().enumerate() {
        match stall {
            Ok((response, after, closing)) => {
                if response.status != 400
                    || response.header("content-type") != Some("application/problem+json")
                    || response.code() != "invalid_request"
                {
                    failures.push(format!(
                        "stall {i}: {} {:?} {}",
                        response.status,
                        response.header("content-type"),
                        String::from_utf8_lossy(&response.body)
                    ));
                }
                answered.push(*after);
                closed.push(*closing);
            }
            Err(e) => failures.push(format!("stall {i}: {e}")),
        }
    }
    eprintln!(
        "stalled uploads: answered {}; closed after the answer {}",
        describe(&answered),
        describe(&closed)
    );
    assert!(
        failures.is_empty(),
        "{} of 300 stalled uploads not answered 400 invalid_request, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let slowest = quantile(&answered, 1.0);
    assert!(
        slowest <= BODY_READ + SLACK,
        "slowest 400 after {slowest:?} (body read timeout {BODY_READ:?})"
    );
    let slowest_close = quantile(&closed, 1.0);
    assert!(
        slowest_close <= SLACK,
        "a connection closed {slowest_close:?} after its 400"
    );
    assert_legit_bids("stalled uploads", &legit, Duration::from_secs(1));

    // A truncated body never becomes a bid.
    let db = app.db().await;
    let auction_uuid: Uuid = auction_id.parse().unwrap();
    let logged: i64 = db
        .query_one(
            "SELECT count(*) FROM bid_log WHERE auction_id = $1",
            &[&auction_uuid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0, "bids logged from truncated bodies");
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 4. A truncated body
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_truncated_body_is_answered_400_when_it_stalls_or_ends() {
    const BODY_READ: Duration = Duration::from_secs(1);
    let app = TestApp::spawn_with(|config| config.limits.edge.body_read_timeout = BODY_READ).await;
    let auction = app.create_auction("seller", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    let token = app.token("bidder", &[]);

    // Stalls: answered once the body read timeout passes.
    let mut conn = RawConn::open(app.addr).await.unwrap();
    conn.send(&truncated_bid(app.addr, &auction_id, &token))
        .await
        .unwrap();
    let sent = Instant::now();
    let response = conn.read_response(Duration::from_secs(4)).await.unwrap();
    let took = sent.elapsed();
    eprintln!(
        "truncated body, stalled: {} after {took:?}",
        response.status
    );
    assert_raw_problem("a stalled body", &response, 400, Some("invalid_request"));
    assert!(
        took <= BODY_READ + Duration::from_millis(1_000),
        "a stalled body answered after {took:?}"
    );

    // Ends (the client half-closes): answered at once, never 503.
    let mut conn = RawConn::open(app.addr).await.unwrap();
    conn.send(&truncated_bid(app.addr, &auction_id, &token))
        .await
        .unwrap();
    conn.shutdown_write().await;
    let sent = Instant::now();
    let response = conn.read_response(Duration::from_secs(4)).await.unwrap();
    let took = sent.elapsed();
    eprintln!("truncated body, ended: {} after {took:?}", response.status);
    assert_ne!(
        response.status, 503,
        "a body that ended early is not an outage"
    );
    assert_raw_problem(
        "a body that ended early",
        &response,
        400,
        Some("invalid_request"),
    );
    assert!(
        took < Duration::from_millis(500),
        "a body that ended early answered after {took:?}"
    );

    // Control: a body sent in two parts within the timeout is a bid.
    let body = br#"{"amount": 1500}"#;
    let head = format!(
        "POST /api/auctions/{auction_id}/bids HTTP/1.1\r\nHost: gavel\r\n\
         Authorization: Bearer {token}\r\nIdempotency-Key: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        new_key(),
        body.len()
    );
    let mut conn = RawConn::open(app.addr).await.unwrap();
    conn.send(head.as_bytes()).await.unwrap();
    conn.send(&body[..11]).await.unwrap();
    tokio::time::sleep(BODY_READ * 2 / 5).await;
    conn.send(&body[11..]).await.unwrap();
    let response = conn.read_response(Duration::from_secs(4)).await.unwrap();
    assert_eq!(
        response.status,
        202,
        "a slow but complete body: {}",
        String::from_utf8_lossy(&response.body)
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 5. The connection limit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_503_and_served_once_below_it() {
    const LIMIT: usize = 50;
    let app = TestApp::spawn_with(|config| {
        config.limits.edge.max_connections = LIMIT;
        config.limits.edge.header_read_timeout = Duration::from_secs(30);
        config.limits.edge.idle_timeout = Duration::from_secs(30);
    })
    .await;

    // The limit's worth of kept-alive connections, each served once.
    let mut held = Vec::new();
    for i in 0..LIMIT {
        let mut conn = RawConn::open(app.addr).await.unwrap();
        conn.send(GET_HEALTHZ).await.unwrap();
        let response = conn
            .read_response(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("held connection {i}: {e}"));
        assert_eq!(response.status, 200, "held connection {i}");
        held.push(conn);
    }

    // One more: refused with 503 overloaded, then closed.
    for extra in 1..=3 {
        let what = format!("connection {} of {LIMIT} allowed", LIMIT + extra);
        let mut conn = RawConn::open(app.addr).await.unwrap();
        let started = Instant::now();
        // The server may answer, and close, before reading the request.
        let _ = conn.send(GET_HEALTHZ).await;
        let response = conn
            .read_response(Duration::from_secs(3))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let took = started.elapsed();
        assert_raw_problem(&what, &response, 503, Some("overloaded"));
        assert!(
            response.header("retry-after").is_some(),
            "{what}: Retry-After"
        );
        let closed = conn.closed_within(Duration::from_secs(3)).await;
        assert!(closed.is_some(), "{what}: closed after its 503");
        eprintln!(
            "connection limit: {what} refused 503 in {took:?}, closed {:?} after",
            closed.unwrap() - started
        );
    }

    // The held connections are untouched by the refusals.
    held[0].send(GET_HEALTHZ).await.unwrap();
    let response = held[0].read_response(Duration::from_secs(5)).await.unwrap();
    assert_eq!(response.status, 200, "a held connection after the refusals");

    // Below the limit again: served.
    drop(held);
    let closed_at = Instant::now();
    eventually(
        Duration::from_secs(5),
        "a connection to be served once the held ones closed",
        || async {
            let mut conn = RawConn::open(app.addr).await.ok()?;
            conn.send(GET_HEALTHZ).await.ok()?;
            let response = conn.read_response(Duration::from_secs(3)).await.ok()?;
            (response.status == 200).then_some(())
        },
    )
    .await;
    eprintln!(
        "connection limit: served again {:?} after the held connections closed",
        closed_at.elapsed()
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 6. Malformed requests on the wire
// ---------------------------------------------------------------------------

/// One malformed request and the status it must get (one of them).
struct Malformed {
    name: &'static str,
    bytes: Vec<u8>,
    statuses: &'static [u16],
}

/// A request whose request target is exactly `length` bytes.
fn long_target(length: usize) -> Vec<u8> {
    let prefix = "/api/auctions/";
    let target = format!("{prefix}{}", "a".repeat(length - prefix.len()));
    assert_eq!(target.len(), length);
    format!("GET {target} HTTP/1.1\r\nHost: gavel\r\n\r\n").into_bytes()
}

/// `GET /api/auctions/{id}` (a token included, so only the malformation is
/// wrong) with `extra` header lines.
fn get_with_headers(token: &str, extra: &[String]) -> Vec<u8> {
    let mut request = format!(
        "GET /api/auctions/{} HTTP/1.1\r\nHost: gavel\r\nAuthorization: Bearer {token}\r\n",
        Uuid::new_v4()
    );
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// `POST` of a bid with `framing` header lines and `body`.
fn post_with_framing(token: &str, framing: &[&str], body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /api/auctions/{}/bids HTTP/1.1\r\nHost: gavel\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: {}\r\nContent-Type: application/json\r\n",
        Uuid::new_v4(),
        new_key()
    )
    .into_bytes();
    for line in framing {
        request.extend_from_slice(line.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    request
}

/// Sends `bytes` and reads the answer (until a whole response, EOF or 3 s).
async fn exchange(addr: SocketAddr, bytes: Vec<u8>) -> (RawConn, Result<RawResponse, String>) {
    let mut conn = RawConn::open(addr).await.unwrap();
    conn.send_in_background(bytes);
    let response = conn.read_response(Duration::from_secs(3)).await;
    (conn, response)
}

#[tokio::test]
async fn malformed_requests_are_refused_with_the_right_status() {
    let app = TestApp::spawn().await;
    let token = app.token("prober", &[]);
    let headers =
        |count: usize| -> Vec<String> { (0..count).map(|i| format!("X-H{i}: v")).collect() };

    // (a) Answered by Gavel's own limits (request target 8192 bytes, 64
    // header fields, 16 KiB of header bytes): problem+json with the
    // contract's headers.
    let by_gavel = [
        Malformed {
            name: "a request target of 10,000 bytes",
            bytes: long_target(10_000),
            statuses: &[414],
        },
        Malformed {
            name: "70 small header fields",
            bytes: get_with_headers(&token, &headers(70)),
            statuses: &[431],
        },
        Malformed {
            name: "one header value of 20 KiB",
            bytes: get_with_headers(&token, &[format!("X-Big: {}", "a".repeat(20 * 1024))]),
            statuses: &[431],
        },
    ];
    // (b) Answered by hyper before Gavel sees a request: a bare status line,
    // no body, none of Gavel's headers, and the connection closed. README
    // lists these; keep the two in step.
    let by_hyper = [
        Malformed {
            name: "Transfer-Encoding: chunked, identity",
            bytes: post_with_framing(
                &token,
                &["Transfer-Encoding: chunked, identity"],
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
            statuses: &[400],
        },
        Malformed {
            name: "Transfer-Encoding: gzip with a body",
            bytes: post_with_framing(&token, &["Transfer-Encoding: gzip"], b"hello"),
            statuses: &[400],
        },
        Malformed {
            name: "two different Content-Length headers",
            bytes: post_with_framing(
                &token,
                &["Content-Length: 5", "Content-Length: 6"],
                b"hello!",
            ),
            statuses: &[400],
        },
        Malformed {
            name: "Content-Length: -1",
            bytes: post_with_framing(&token, &["Content-Length: -1"], b""),
            statuses: &[400],
        },
        Malformed {
            name: "a NUL byte in a header value",
            bytes: get_with_headers(&token, &["X-Test: a\0b".to_owned()]),
            statuses: &[400],
        },
        Malformed {
            // Past hyper's URI limit (65,534 bytes): 414 when hyper's read
            // of the arriving line completes it (as on loopback, where the
            // line is in the socket at once), 431 should the line arrive
            // slowly enough to fill the 64 KiB read buffer unfinished.
            name: "a request target of 100,000 bytes",
            bytes: long_target(100_000),
            statuses: &[414, 431],
        },
        Malformed {
            name: "a header value of 1 MB",
            bytes: get_with_headers(&token, &[format!("X-Big: {}", "a".repeat(1 << 20))]),
            statuses: &[431],
        },
        Malformed {
            name: "10,000 header fields",
            bytes: get_with_headers(&token, &headers(10_000)),
            statuses: &[431],
        },
    ];

    for case in by_gavel {
        let (_conn, response) = exchange(app.addr, case.bytes).await;
        let response = response.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        eprintln!(
            "malformed, answered by Gavel: {} -> {} {}",
            case.name,
            response.status,
            response.code()
        );
        assert_raw_problem(case.name, &response, case.statuses[0], None);
    }
    for case in by_hyper {
        let (mut conn, response) = exchange(app.addr, case.bytes).await;
        let response = response.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let closed = conn.closed_within(Duration::from_secs(3)).await.is_some();
        eprintln!(
            "malformed, answered by hyper: {} -> {} (closed: {closed})",
            case.name, response.status
        );
        assert!(
            case.statuses.contains(&response.status),
            "{}: expected {:?}: {response:?}",
            case.name,
            case.statuses
        );
        assert!(
            closed,
            "{}: the connection is closed after the answer",
            case.name
        );
    }
    // The server is unharmed.
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    app.stop().await;
}
