//! Coalesced key lookups for the bids the pre-check refuses.
//!
//! A bid refused before the append (too low against the auction's
//! snapshot, closed, the seller's own) may retry one accepted earlier, so
//! its `Idempotency-Key` is looked up before the refusal is answered. When
//! the price races ahead in a final burst, most bids are such refusals;
//! one statement and one connection each would let them fill the API pool
//! and the in-flight limit ahead of the bids that can still be accepted.
//! So a request queues its lookup, and a few looker tasks take turns: the
//! one whose turn it is takes a connection, then everything queued (up to
//! the batch maximum) and answers them all from one statement
//! ([`bids::find_keys`], which reads the bid each key names and the WAL
//! position for read-your-writes in the same round trip).
//!
//! A lookup not answered within its request's budget is answered
//! `503 overloaded`; a full queue is answered so at once. Nothing is
//! written here, so an abandoned lookup costs nothing but its row in the
//! batch.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::PgLsn;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::bids::{self, BidRecord};
use crate::db::Pool;
use crate::error::ApiError;

/// Looker tasks, each with at most one statement in flight.
const LOOKERS: usize = 2;
/// Most keys one statement looks up.
const BATCH_MAX: usize = 1_000;
/// Lookups queued before new ones are refused at once.
const QUEUE: usize = 4 * BATCH_MAX;

/// What a lookup found: the bid the key names, if any, and the primary's
/// WAL position when it was read.
pub(super) type Found = (Option<BidRecord>, Option<PgLsn>);

/// The queue of key lookups and the lookers that empty it. Cheap to clone.
#[derive(Clone)]
pub(super) struct KeyLookups {
    queue: mpsc::Sender<Lookup>,
    lookers: Arc<Lookers>,
}

/// What the looker tasks share.
struct Lookers {
    /// Held by the looker whose turn it is to collect a batch.
    queue: tokio::sync::Mutex<mpsc::Receiver<Lookup>>,
    pool: Pool,
}

/// A queued lookup and where its answer goes.
struct Lookup {
    auction_id: Uuid,
    bidder: String,
    key: String,
    reply: oneshot::Sender<Result<Found, ApiError>>,
}

impl KeyLookups {
    /// Lookups through `pool`; none is answered until [`KeyLookups::run`]
    /// runs.
    pub(super) fn new(pool: Pool) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        KeyLookups {
            queue,
            lookers: Arc::new(Lookers {
                queue: tokio::sync::Mutex::new(receiver),
                pool,
            }),
        }
    }

    /// The bid `bidder` placed with `key` on `auction_id`, answered before
    /// `budget` or refused `503 overloaded`.
    pub(super) async fn find(
        &self,
        auction_id: Uuid,
        bidder: &str,
        key: &str,
        budget: Instant,
    ) -> Result<Found, ApiError> {
        let (reply, answer) = oneshot::channel();
        let lookup = Lookup {
            auction_id,
            bidder: bidder.to_owned(),
            key: key.to_owned(),
            reply,
        };
        if let Err(e) = self.queue.try_send(lookup) {
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => ApiError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => stopped(),
            });
        }
        match tokio::time::timeout_at(budget.into(), answer).await {
            Ok(Ok(found)) => found,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(ApiError::Overloaded),
        }
    }

    /// Runs the lookers until `shutdown`.
    pub(super) fn run(
        &self,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let lookers = self.lookers.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..LOOKERS {
                tasks.spawn(lookers.clone().run(shutdown.clone()));
            }
            while let Some(ended) = tasks.join_next().await {
                if let Err(e) = ended {
                    tracing::error!(error = %e, "a key looker failed");
                }
            }
        }
    }
}

fn stopped() -> ApiError {
    ApiError::Unavailable(anyhow::anyhow!("the key lookups have stopped"))
}

impl Lookers {
    /// One looker: when it is this looker's turn, take a connection and
    /// the queued lookups, answer them, repeat until `shutdown`.
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let mut queue = self.queue.lock().await;
            let first = tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                next = queue.recv() => next,
            };
            let Some(first) = first else { return };
            let client = self.pool.get().await;
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX {
                match queue.try_recv() {
                    Ok(lookup) => batch.push(lookup),
                    Err(_) => break,
                }
            }
            drop(queue);
            // Requests that gave up need no answer.
            batch.retain(|lookup| !lookup.reply.is_closed());
            match client {
                Ok(client) => answer(&client, batch).await,
                Err(e) => fail(batch, e),
            }
        }
    }
}

/// Looks up `batch` with one statement on `client` and answers each.
async fn answer(client: &deadpool_postgres::Object, batch: Vec<Lookup>) {
    if batch.is_empty() {
        return;
    }
    let wanted: Vec<(Uuid, &str, &str)> = batch
        .iter()
        .map(|l| (l.auction_id, l.bidder.as_str(), l.key.as_str()))
        .collect();
    let result = bids::find_keys(client, &wanted).await;
    match result {
        Ok((found, position)) => {
            for lookup in batch {
                let record = found
                    .get(&(lookup.auction_id, lookup.bidder, lookup.key))
                    .cloned();
                let _ = lookup.reply.send(Ok((record, position)));
            }
        }
        Err(e) => fail(batch, e),
    }
}

/// Answers every lookup of `batch` with `error`.
fn fail<E>(batch: Vec<Lookup>, error: E)
where
    Arc<E>: Into<ApiError>,
{
    let failure = Arc::new(error);
    for lookup in batch {
        let _ = lookup.reply.send(Err(failure.clone().into()));
    }
}
