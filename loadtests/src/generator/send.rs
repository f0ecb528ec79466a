//! One bid or read and its answer: the attempt within the open-request
//! limit, what the answer tells the client (the bid's fate, the auction's
//! next minimum), and the bid's retries as the client's policy allows.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, ETAG, IF_NONE_MATCH, RETRY_AFTER,
};
use hyper::{Request, StatusCode};
use serde::Deserialize;
use uuid::Uuid;

use super::{Amount, Fate, SentBid, Shared};
use crate::client::{self, Failure};
use crate::receipts::Seen;
use crate::record::{Answered, Ended, Ending, Kind};
use crate::retry::Decision;

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The answer to one attempt.
enum Answer {
    Status(StatusCode, Option<Duration>, bytes::Bytes, bool),
    Timeout,
    Transport,
    /// No slot came free within the client timeout: nothing was sent.
    NotSent,
}

/// A slot among the generator's open requests, waiting at most the client
/// timeout (an overwhelmed target must not pile up requests without end).
async fn slot(shared: &Shared) -> Option<tokio::sync::SemaphorePermit<'_>> {
    tokio::time::timeout(shared.timeout, shared.slots.acquire())
        .await
        .ok()
        .map(|permit| permit.expect("the semaphore is never closed"))
}

/// One attempt of a bid, due at `due` (see [`send_attempt`]), filed with
/// its own latency.
async fn attempt(
    shared: &Shared,
    due: Instant,
    build: impl FnOnce() -> Request<client::Body>,
) -> Answer {
    let answer = send_attempt(shared, build).await;
    let status = match &answer {
        Answer::Status(status, ..) => Some(*status),
        _ => None,
    };
    note_attempt(shared, Kind::Bid, due, status);
    answer
}

/// Files one attempt of a `kind` request, due at `due`, by its answer's
/// status (`None`: no answer).
fn note_attempt(shared: &Shared, kind: Kind, due: Instant, status: Option<StatusCode>) {
    let answered = match status {
        Some(s) if answered_ok(s) => Answered::Ok,
        Some(StatusCode::SERVICE_UNAVAILABLE) => Answered::Unavailable,
        _ => Answered::Otherwise,
    };
    let latency = due.elapsed();
    (shared.recorder.lock().expect("recorder")).attempt(kind, answered, latency);
}

/// Whether `status` answers a request: 2xx, or 304 for a conditional read.
fn answered_ok(status: StatusCode) -> bool {
    status.is_success() || status == StatusCode::NOT_MODIFIED
}

/// Sends the request `build` makes once a slot is free: what it carries
/// is decided when it goes out, as a client's would be, not while it
/// waited for the generator's slot.
async fn send_attempt(shared: &Shared, build: impl FnOnce() -> Request<client::Body>) -> Answer {
    let Some(_slot) = slot(shared).await else {
        return Answer::NotSent;
    };
    match shared.client.send(build(), shared.timeout).await {
        Ok(response) => {
            let retry_after = response
                .headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs);
            let replayed = response
                .headers
                .get(&IDEMPOTENT_REPLAYED)
                .is_some_and(|v| v.as_bytes() == b"true");
            Answer::Status(response.status, retry_after, response.body, replayed)
        }
        Err(Failure::Timeout) => Answer::Timeout,
        Err(Failure::Transport) => Answer::Transport,
    }
}

fn problem_code(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Problem {
        code: String,
    }
    serde_json::from_slice::<Problem>(body)
        .map(|p| p.code)
        .unwrap_or_else(|_| status.as_u16().to_string())
}

/// What a bid's client does after one attempt.
enum Next {
    /// The bid ended so (ending, fate, replayed).
    Done(Ending, Fate, bool),
    /// The bid may be tried again, after at least the server's
    /// `Retry-After` (if any); if it is not, it ends so.
    Retry(Ending, Fate, Option<Duration>),
}

/// Judges the answer to one attempt of a bid on `auction`. `ambiguous`
/// says whether some attempt may have reached the log; it is updated.
fn judge_bid_answer(shared: &Shared, auction: usize, answer: Answer, ambiguous: &mut bool) -> Next {
    let unknown_or = |ambiguous: bool, fate: Fate| if ambiguous { Fate::Unknown } else { fate };
    match answer {
        Answer::Status(status, _, body, replayed) if status.is_success() => {
            acknowledged(shared, auction, &body, replayed)
        }
        Answer::Status(status, retry_after, body, _)
            if status == StatusCode::SERVICE_UNAVAILABLE =>
        {
            *ambiguous = true;
            let ending = Ending::ServerError(problem_code(status, &body));
            Next::Retry(ending, Fate::Unknown, retry_after)
        }
        Answer::Status(status, Some(retry_after), body, _)
            if status == StatusCode::TOO_MANY_REQUESTS =>
        {
            let code = problem_code(status, &body);
            let fate = unknown_or(*ambiguous, Fate::Refused(code.clone()));
            Next::Retry(Ending::Refused(code), fate, Some(retry_after))
        }
        Answer::Status(status, _, body, _) => {
            let code = problem_code(status, &body);
            // A 5xx may come after the bid committed: only a 4xx is sure.
            if status.is_server_error() {
                Next::Done(Ending::ServerError(code), Fate::Unknown, false)
            } else {
                let fate = unknown_or(*ambiguous, Fate::Refused(code.clone()));
                Next::Done(Ending::Refused(code), fate, false)
            }
        }
        Answer::Timeout => {
            *ambiguous = true;
            Next::Retry(Ending::Timeout, Fate::Unknown, None)
        }
        Answer::Transport => {
            *ambiguous = true;
            Next::Retry(Ending::Transport, Fate::Unknown, None)
        }
        Answer::NotSent => {
            Next::Retry(Ending::Timeout, unknown_or(*ambiguous, Fate::NotSent), None)
        }
    }
}

/// A 2xx to a bid: what the clients learn of the auction's price.
fn acknowledged(shared: &Shared, auction: usize, body: &[u8], replayed: bool) -> Next {
    #[derive(Deserialize)]
    struct Bid {
        id: Uuid,
        auction_price: Option<i64>,
    }
    match serde_json::from_slice::<Bid>(body) {
        Ok(bid) => {
            if let Some(price) = bid.auction_price {
                let next = price.saturating_add(shared.increments.step_at(price));
                shared.book.next_min[auction].fetch_max(next, Ordering::Relaxed);
            }
            Next::Done(Ending::Ok, Fate::Acked(bid.id), replayed)
        }
        Err(_) => Next::Done(
            Ending::ServerError("unparsable 2xx body".into()),
            Fate::Unknown,
            false,
        ),
    }
}

/// Sends one bid, retrying with the same key as the clients' policy and
/// budget allow, and records how it ended and what the client knows of it.
pub(super) async fn send_bid(
    shared: &Shared,
    intended: Instant,
    auction: usize,
    bidder: usize,
    amount: Amount,
) {
    let planned = amount;
    let key = Uuid::new_v4().to_string();
    let key_header = HeaderValue::from_str(&key).expect("a UUID is a valid header value");
    // The amount is chosen when the first attempt goes out; every retry
    // sends the same body.
    let mut body: Option<(i64, Bytes)> = None;
    let since_t0 = || Instant::now().saturating_duration_since(shared.t0);
    shared.retries.first_attempt(since_t0());
    let (mut attempts, mut ambiguous, mut withheld) = (0, false, None);
    let mut due = intended;
    let (ending, fate, replayed) = loop {
        attempts += 1;
        let answer = attempt(shared, due, || {
            let (_, body) = body.get_or_insert_with(|| {
                let amount = bid_amount(shared, auction, planned);
                (amount, Bytes::from(format!("{{\"amount\":{amount}}}")))
            });
            bid_request(shared, auction, bidder, &key_header, body)
        })
        .await;
        let (ending, fate, retry_after) =
            match judge_bid_answer(shared, auction, answer, &mut ambiguous) {
                Next::Done(ending, fate, replayed) => break (ending, fate, replayed),
                Next::Retry(ending, fate, retry_after) => (ending, fate, retry_after),
            };
        let decision =
            shared
                .retries
                .decide(attempts, retry_after, since_t0(), &mut rand::thread_rng());
        match decision {
            Decision::Retry(wait) => {
                tokio::time::sleep(wait).await;
                due = Instant::now();
            }
            Decision::Exhausted => break (ending, fate, false),
            Decision::Withheld(why) => {
                withheld = Some(why);
                break (ending, fate, false);
            }
        }
    };
    let amount = body.map_or_else(
        || bid_amount(shared, auction, planned),
        |(amount, _)| amount,
    );
    let done = Instant::now();
    let sent = intended.saturating_duration_since(shared.t0);
    shared.recorder.lock().expect("recorder").ended(Ended {
        kind: Kind::Bid,
        sent_s: sent.as_secs() as usize,
        done_s: done.saturating_duration_since(shared.t0).as_secs() as usize,
        latency: done - intended,
        attempts,
        ending: &ending,
        replayed,
        withheld,
    });
    shared.sent.lock().expect("sent bids").push(SentBid {
        key,
        bidder: shared.bidder_names[bidder].clone(),
        auction,
        amount,
        offset_ms: sent.as_millis() as u64,
        fate,
    });
}

/// The amount a bid offers: exact (a trace's), or `steps` increments above
/// the auction's last known next minimum.
fn bid_amount(shared: &Shared, auction: usize, amount: Amount) -> i64 {
    match amount {
        Amount::Exact(amount) => amount,
        Amount::Steps(steps) => {
            let floor = shared.book.next_min[auction].load(Ordering::Relaxed);
            let step = shared.increments.step_at(floor);
            floor.saturating_add(step.saturating_mul(i64::from(steps)))
        }
    }
}

/// One attempt's request: every attempt of a bid carries the same key and body.
fn bid_request(
    shared: &Shared,
    auction: usize,
    bidder: usize,
    key: &HeaderValue,
    body: &Bytes,
) -> Request<client::Body> {
    Request::post(shared.bid_paths[auction].clone())
        .header(AUTHORIZATION, shared.bearer[bidder].clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(&IDEMPOTENCY_KEY, key.clone())
        .body(client::Body::new(body.clone()))
        .expect("the request is well formed")
}

/// Sends one read and records how it ended.
pub(super) async fn send_read(shared: &Shared, intended: Instant, auction: usize, reader: usize) {
    let mut request = Request::get(shared.read_paths[auction].clone())
        .header(AUTHORIZATION, shared.bearer[reader].clone());
    let tag = if shared.if_none_match {
        shared.book.etags[auction].lock().expect("etag").clone()
    } else {
        None
    };
    if let Some(tag) = &tag {
        request = request.header(IF_NONE_MATCH, tag.clone());
    }
    let request = request
        .body(client::Body::default())
        .expect("the request is well formed");
    let ending = match attempt_read(shared, intended, request, auction, tag).await {
        Answer::Status(status, _, _, _) if answered_ok(status) => Ending::Ok,
        Answer::Status(status, _, body, _) if status.is_server_error() => {
            Ending::ServerError(problem_code(status, &body))
        }
        Answer::Status(status, _, body, _) => Ending::Refused(problem_code(status, &body)),
        Answer::Timeout | Answer::NotSent => Ending::Timeout,
        Answer::Transport => Ending::Transport,
    };
    let done = Instant::now();
    shared.recorder.lock().expect("recorder").ended(Ended {
        kind: Kind::Read,
        sent_s: intended.saturating_duration_since(shared.t0).as_secs() as usize,
        done_s: done.saturating_duration_since(shared.t0).as_secs() as usize,
        latency: done - intended,
        attempts: 1,
        ending: &ending,
        replayed: false,
        withheld: None,
    });
}

/// One read (`tag`: the `If-None-Match` it sent); a fresh view updates
/// what the clients know of the auction, and the version shown is filed.
async fn attempt_read(
    shared: &Shared,
    due: Instant,
    request: Request<client::Body>,
    auction: usize,
    tag: Option<HeaderValue>,
) -> Answer {
    let Some(_slot) = slot(shared).await else {
        return Answer::NotSent;
    };
    let response = shared.client.send(request, shared.timeout).await;
    let status = response.as_ref().ok().map(|r| r.status);
    note_attempt(shared, Kind::Read, due, status);
    let response = match response {
        Ok(response) => response,
        Err(Failure::Timeout) => return Answer::Timeout,
        Err(Failure::Transport) => return Answer::Transport,
    };
    let shown = match response.status {
        StatusCode::OK => response.headers.get(ETAG),
        StatusCode::NOT_MODIFIED => tag.as_ref(),
        _ => None,
    };
    if let Some(version) = shown.and_then(etag_version) {
        shared.seen.lock().expect("seen views").push(Seen {
            auction: auction as u32,
            version,
            at_us: shared.origin.elapsed().as_micros() as u64,
        });
    }
    if response.status == StatusCode::OK {
        #[derive(Deserialize)]
        struct View {
            next_min_bid: i64,
        }
        if let Ok(view) = serde_json::from_slice::<View>(&response.body) {
            shared.book.next_min[auction].fetch_max(view.next_min_bid, Ordering::Relaxed);
        }
        if let Some(etag) = response.headers.get(ETAG) {
            *shared.book.etags[auction].lock().expect("etag") = Some(etag.clone());
        }
    }
    Answer::Status(response.status, None, response.body, false)
}

/// The version a strong `ETag` (`"42"`) names.
fn etag_version(tag: &HeaderValue) -> Option<i64> {
    let tag = tag.to_str().ok()?;
    tag.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}
