//! Bidders' live bid changes: one reader per process polls the event log
//! for rows below the oldest transaction still running (so a row that
//! commits late is never skipped) and hands each change to the streams of
//! its bidder on this process. A stream that resumes reads what it missed
//! from the log itself, up to where this reader took over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::{broadcast, mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::bids::BidRecord;
use crate::db::events::{self, EventRow, Position};
use crate::db::Pool;
use crate::domain::BidStatus;
use crate::error::ApiError;
use crate::signals::{Resolved, Signals};

/// How often the log is read while some bidder is watching, at the
/// latest: an announced change wakes the reader sooner, at most once per
/// [`MIN_GAP`].
const POLL: Duration = Duration::from_millis(50);
const MIN_GAP: Duration = Duration::from_millis(10);
/// How often it is read otherwise, to keep the reader's place current.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Changes queued for one stream before it is closed as too slow (it
/// resumes from its last cursor).
const QUEUE: usize = 1_024;

/// One change of one bid, as a bidder's stream sends it.
#[derive(Debug, Clone)]
pub struct BidEvent {
    /// Where the change stands in the log.
    pub cursor: Cursor,
    /// The bid, with the status of this change.
    pub bid: BidRecord,
}

/// A change's place in the log: its row and its entry in the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// The event row.
    pub position: Position,
    /// The entry of the row.
    pub entry: u32,
}

impl Cursor {
    /// The opaque form a stream sends as `id:`.
    pub fn encode(&self) -> String {
        let p = &self.position;
        let raw = format!("v1.{}.{}.{}.{}", p.xid, p.auction_id, p.n, self.entry);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Reads a cursor a stream sent; `None` when it is not one.
    pub fn decode(text: &str) -> Option<Cursor> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let mut parts = raw.strip_prefix("v1.")?.split('.');
        let cursor = Cursor {
            position: Position {
                xid: parts.next()?.parse().ok()?,
                auction_id: parts.next()?.parse().ok()?,
                n: parts.next()?.parse().ok()?,
            },
            entry: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(cursor)
    }
}

/// The bidders' feeds of this process. Cheap to clone.
#[derive(Clone)]
pub struct BidderFeeds {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Held for a whole read of the log, so a stream subscribes either
    /// before a read (and gets its rows) or after it (and reads them back).
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Rows of transactions below this one have been handed out.
    horizon: Option<i64>,
    subscribers: HashMap<String, Vec<mpsc::Sender<BidEvent>>>,
}

/// A stream's hold on its bidder's changes.
pub struct Subscription {
    /// Changes from rows of transactions at or above `from`, in log order.
    pub events: mpsc::Receiver<BidEvent>,
    /// Where the live changes start; a resuming stream reads those below
    /// it from the log ([`BidderFeeds::since`]).
    pub from: i64,
}

impl BidderFeeds {
    /// Feeds reading the event log through `pool` until `shutdown`, woken
    /// by the changes `signals` announces.
    pub fn new(pool: Pool, signals: &Signals, shutdown: CancellationToken) -> Self {
        let inner = Arc::new(Inner {
            pool,
            state: Mutex::new(State::default()),
        });
        tokio::spawn(follow(inner.clone(), signals.subscribe(), shutdown));
        BidderFeeds { inner }
    }

    /// Starts receiving `bidder`'s changes.
    pub async fn subscribe(&self, bidder: &str) -> Result<Subscription, ApiError> {
        let mut state = self.inner.state.lock().await;
        let from = match state.horizon {
            Some(horizon) => horizon,
            None => {
                let client = self.inner.pool.get().await?;
                let horizon = events::horizon(&client).await?;
                state.horizon = Some(horizon);
                horizon
            }
        };
        let (tx, events) = mpsc::channel(QUEUE);
        state
            .subscribers
            .entry(bidder.to_owned())
            .or_default()
            .push(tx);
        Ok(Subscription { events, from })
    }

    /// `bidder`'s changes after `after` in rows of transactions below
    /// `below`; `None` when the cursor's row is no longer in the log.
    pub async fn since(
        &self,
        bidder: &str,
        after: Cursor,
        below: i64,
    ) -> Result<Option<Vec<BidEvent>>, ApiError> {
        let client = self.inner.pool.get().await?;
        if !events::exists(&client, after.position).await? {
            return Ok(None);
        }
        let rows = events::bidder_rows(&client, bidder, after.position, below).await?;
        let mut changes = changes_of(&rows, |b| b == bidder);
        changes.retain(|change| change.cursor > after);
        Ok(Some(with_bids(&client, changes).await?))
    }
}

/// One entry of an event row.
struct Change {
    cursor: Cursor,
    bid_id: Uuid,
    status: String,
}

/// The entries of `rows` whose bidder `wanted` picks, in log order.
fn changes_of(rows: &[EventRow], wanted: impl Fn(&str) -> bool) -> Vec<Change> {
    let mut changes = Vec::new();
    for row in rows {
        let entries = row.bid_ids.iter().zip(&row.bidders).zip(&row.statuses);
        for (i, ((bid_id, bidder), status)) in entries.enumerate() {
            if wanted(bidder) {
                changes.push(Change {
                    cursor: Cursor {
                        position: row.position,
                        entry: i as u32,
                    },
                    bid_id: *bid_id,
                    status: status.clone(),
                });
            }
        }
    }
    changes
}

/// The changes with their bids as stored, each given the change's status.
async fn with_bids(
    client: &deadpool_postgres::Object,
    changes: Vec<Change>,
) -> Result<Vec<BidEvent>, ApiError> {
    let keys: Vec<(Uuid, Uuid)> = (changes.iter())
        .map(|c| (c.cursor.position.auction_id, c.bid_id))
        .collect();
    let stored: HashMap<Uuid, BidRecord> = (events::bids(client, &keys).await?.into_iter())
        .map(|bid| (bid.id, bid))
        .collect();
    Ok(changes
        .into_iter()
        .filter_map(|change| {
            let mut bid = stored.get(&change.bid_id)?.clone();
            bid.status = change.status.parse().unwrap_or(BidStatus::Pending);
            Some(BidEvent {
                cursor: change.cursor,
                bid,
            })
        })
        .collect())
}

/// Reads the log until `shutdown`: soon after an announced change while
/// someone watches, every [`POLL`] at the latest, rarely otherwise.
async fn follow(
    inner: Arc<Inner>,
    mut changes: broadcast::Receiver<Resolved>,
    shutdown: CancellationToken,
) {
    loop {
        let watched = match read_once(&inner).await {
            Ok(watched) => watched,
            Err(e) => {
                tracing::warn!(error = %e, "reading the event log failed");
                true
            }
        };
        let pause = if watched { POLL } else { IDLE_POLL };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(MIN_GAP) => {}
        }
        changes = changes.resubscribe();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause - MIN_GAP) => {}
            _ = changes.recv(), if watched => {}
        }
    }
}

/// One read of the log's new final rows, handed to the subscribed
/// bidders; returns whether anyone is subscribed.
async fn read_once(inner: &Inner) -> Result<bool, ApiError> {
    let mut state = inner.state.lock().await;
    state.subscribers.retain(|_, streams| {
        streams.retain(|tx| !tx.is_closed());
        !streams.is_empty()
    });
    let client = inner.pool.get().await?;
    if state.subscribers.is_empty() {
        // Nobody to hand rows to: only keep the place current.
        let horizon = events::horizon(&client).await?;
        state.horizon = Some(horizon.max(state.horizon.unwrap_or(horizon)));
        return Ok(false);
    }
    let from = state.horizon.unwrap_or(i64::MAX);
    let (horizon, rows) = events::read_from(&client, from).await?;
    let subscribers = &state.subscribers;
    let changes = changes_of(&rows, |b| subscribers.contains_key(b));
    let delivered = with_bids(&client, changes).await?;
    drop(client);
    for event in delivered {
        let Some(streams) = state.subscribers.get_mut(&event.bid.bidder_id) else {
            continue;
        };
        // A stream that cannot take more is closed; it resumes from its cursor.
        streams.retain(|tx| tx.try_send(event.clone()).is_ok());
    }
    state.horizon = Some(horizon.max(state.horizon.unwrap_or(horizon)));
    Ok(!state.subscribers.is_empty())
}
