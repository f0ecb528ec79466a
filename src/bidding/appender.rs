//! Coalesced appends: concurrent bids of the log path share one durable
//! statement (group commit).
//!
//! A bid must be committed before it is acknowledged, and one transaction
//! with its WAL flush per bid is what limits a hot auction's last seconds.
//! So a request hands its bid to the [`Appender`]'s bounded queue and awaits
//! the answer. A few writer tasks take turns at the queue: the one whose
//! turn it is waits for the oldest bid, takes its connection (writers have
//! a pool of their own, so no request waiting for the API pool stands
//! before them) within that bid's budget, then takes everything queued behind it (up to the
//! batch maximum, never waiting for more to arrive, so a lone bid still
//! costs one round trip) and writes the batch with one multi-row statement
//! ([`bids::append_batch`], which reads the WAL position for
//! read-your-writes in the same round trip) while the next writer collects
//! the next batch.
//!
//! The bid path's contract holds for every request:
//! - Answered `2xx` only from its batch's committed outcome: inserted, or
//!   the earlier bid of its key (looked up after the batch committed, so a
//!   key repeated within the batch finds its first use). When a statement
//!   fails, every bid it held gets the failure (`503` for timeouts, lock
//!   timeouts and lost connections); nothing of it was written.
//! - A bid still queued when its pool-wait budget runs out, or whose
//!   request is gone, is withdrawn and never written; a full queue is
//!   answered `503 overloaded` at once.
//! - Once in a batch, a bid is written or failed with the batch whatever its
//!   client does: writers are tasks of their own, a request only awaits.
//! - Exactly one answer: a claim flag decides, once, whether the request
//!   withdrew its bid or a writer took it.
//!
//! When a batch has been in flight far longer than a statement takes (a
//! lock, an I/O stall), the other writers wait for it rather than start
//! more statements that would queue behind it: the bids meanwhile wait in
//! the queue and are shed at their budget, so a stalled database holds at
//! most one batch of requests, not one per writer.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, PoolError, TimeoutType};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_postgres::types::PgLsn;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::admission::Admission;
use crate::db::bids::{self, Append, NewBid};
use crate::db::{Pool, WaitEnd};
use crate::error::ApiError;
use crate::signals::Signals;

/// A batch in flight for longer than this means the database is stalled
/// (an append statement normally takes a few milliseconds).
const STALL: Duration = Duration::from_millis(100);
/// The queue holds at least this many bids, however small the batches.
const MIN_QUEUE: usize = 256;

/// How bids are coalesced (`GAVEL_APPEND_WRITERS`, `GAVEL_APPEND_BATCH_MAX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendSettings {
    /// Writer tasks, each writing one batch at a time on its own connection
    /// (at most the API pool's size are started).
    pub writers: usize,
    /// Most bids written by one statement.
    pub batch_max: usize,
    /// The longest a batch may take, commit included (the statement timeout
    /// plus a margin): past it the batch's outcome is unknown, its
    /// connection is dropped and its bids are answered `503`.
    pub write_limit: Duration,
}

impl Default for AppendSettings {
    fn default() -> Self {
        AppendSettings {
            writers: 1,
            batch_max: 500,
            write_limit: Duration::from_secs(6),
        }
    }
}

/// A batch's committed outcome for one bid.
pub(super) struct Appended {
    /// Inserted, or the earlier bid of its key.
    pub appended: Append,
    /// The primary's WAL position after the batch, for read-your-writes.
    pub wal_position: Option<PgLsn>,
}

/// The queue of bids to append and the writers that empty it. Cheap to clone.
#[derive(Clone)]
pub(super) struct Appender {
    queue: mpsc::Sender<Submission>,
    writers: Arc<Writers>,
}

/// What the writer tasks share.
struct Writers {
    /// Held by the writer whose turn it is to collect a batch.
    queue: tokio::sync::Mutex<mpsc::Receiver<Submission>>,
    pool: Pool,
    signals: Signals,
    count: usize,
    batch_max: usize,
    write_limit: Duration,
    /// When each writer's batch in flight started.
    in_flight: Mutex<Vec<Option<Instant>>>,
    /// Notified whenever a batch ends.
    batch_done: Notify,
    /// Told how long the bids of each batch waited in the queue.
    admission: Arc<Admission>,
    /// Bids queued and neither taken nor withdrawn.
    waiting: Arc<AtomicUsize>,
}

/// A queued bid and where its answer goes.
struct Submission {
    bid: NewBid,
    /// When the bid was queued: its wait for a connection started.
    queued_at: Instant,
    /// When the request stops waiting to be taken into a batch.
    budget: Instant,
    /// Set once, by whichever comes first: a writer taking (or refusing)
    /// the bid, or its request withdrawing it.
    claimed: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<Appended, ApiError>>,
    /// The appender's count of waiting bids, left when claimed.
    waiting: Arc<AtomicUsize>,
}

impl Submission {
    /// Claims the bid for a writer, ending its wait for a connection of
    /// `pool` with `end`; false when its request withdrew it.
    fn claim(&self, pool: &Pool, end: WaitEnd) -> bool {
        let claimed = !self.claimed.swap(true, Ordering::AcqRel);
        if claimed {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            pool.wait_ended(self.queued_at, end);
        }
        claimed
    }

    fn withdrawn(&self) -> bool {
        self.claimed.load(Ordering::Acquire)
    }

    /// Sends the answer (the request may be gone: then nobody hears it).
    fn answer(self, result: Result<Appended, ApiError>) {
        let _ = self.reply.send(result);
    }

    /// Sheds the bid, out of time, unless its request already withdrew it.
    fn refuse(self, pool: &Pool, admission: &Admission) {
        if self.claim(pool, WaitEnd::TimedOut) {
            self.answer(Err(admission.queue_refusal()));
        }
    }
}

/// Withdraws a queued bid when its request is dropped (a client hanging
/// up); a no-op once a writer has taken the bid or the request withdrew it.
struct Withdraw<'a> {
    claimed: Arc<AtomicBool>,
    pool: &'a Pool,
    waiting: &'a AtomicUsize,
    queued_at: Instant,
}

impl Withdraw<'_> {
    /// Claims the bid for its request: it leaves the queue unwritten.
    fn claim(&self, end: WaitEnd) -> bool {
        let claimed = !self.claimed.swap(true, Ordering::AcqRel);
        if claimed {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            self.pool.wait_ended(self.queued_at, end);
        }
        claimed
    }
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.claim(WaitEnd::Abandoned);
    }
}

impl Appender {
    /// An appender writing through `pool`, waking the resolver via
    /// `signals` and telling `admission` how long bids queue; nothing is
    /// written until [`Appender::run`] runs.
    pub(super) fn new(
        pool: Pool,
        signals: Signals,
        settings: AppendSettings,
        admission: Arc<Admission>,
    ) -> Self {
        let count = settings.writers.clamp(1, pool.status().max_size.max(1));
        let batch_max = settings.batch_max.max(1);
        // Room for every writer's next full batch, twice over.
        let (queue, receiver) = mpsc::channel((2 * count * batch_max).max(MIN_QUEUE));
        Appender {
            queue,
            writers: Arc::new(Writers {
                queue: tokio::sync::Mutex::new(receiver),
                pool,
                signals,
                count,
                batch_max,
                write_limit: settings.write_limit,
                in_flight: Mutex::new(vec![None; count]),
                batch_done: Notify::new(),
                waiting: admission.waiting(),
                admission,
            }),
        }
    }

    /// Bids waiting in the queue now (not those withdrawn or taken).
    pub(super) fn queued(&self) -> usize {
        self.writers.waiting.load(Ordering::Relaxed)
    }

    /// The most bids the queue holds.
    pub(super) fn capacity(&self) -> usize {
        self.queue.max_capacity()
    }

    /// Appends `bid` with the next batch, unless it cannot be taken into
    /// one before `budget`. The bid's time in the queue is its wait for a
    /// connection, and shows in the append pool's metrics as one: among the
    /// waiters, in the wait times, and as a wait timeout when it is shed.
    pub(super) async fn append(&self, bid: NewBid, budget: Instant) -> Result<Appended, ApiError> {
        let pool = &self.writers.pool;
        let claimed = Arc::new(AtomicBool::new(false));
        let (reply, mut answer) = oneshot::channel();
        let queued_at = Instant::now();
        let submission = Submission {
            bid,
            queued_at,
            budget,
            claimed: claimed.clone(),
            reply,
            waiting: self.writers.waiting.clone(),
        };
        pool.wait_started();
        self.writers.waiting.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.queue.try_send(submission) {
            self.writers.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(match e {
                // As many bids wait as the writers' next batches can hold
                // (the door refuses most bids beyond: this one came between).
                mpsc::error::TrySendError::Full(_) => {
                    pool.wait_ended(queued_at, WaitEnd::TimedOut);
                    self.writers.admission.queue_refusal()
                }
                mpsc::error::TrySendError::Closed(_) => {
                    pool.wait_ended(queued_at, WaitEnd::Abandoned);
                    ApiError::Unavailable(anyhow::anyhow!("the bid appender has stopped"))
                }
            });
        }
        let withdraw = Withdraw {
            claimed,
            pool,
            waiting: &self.writers.waiting,
            queued_at,
        };
        tokio::select! {
            answer = &mut answer => return answered(answer),
            () = tokio::time::sleep_until(budget.into()) => {}
        }
        if withdraw.claim(WaitEnd::TimedOut) {
            // Still queued at the end of its budget: withdrawn, never written.
            return Err(self.writers.admission.queue_refusal());
        }
        // In a batch: its outcome is this bid's.
        answered(answer.await)
    }

    /// Runs the writers until `shutdown`; then they take no more bids,
    /// write (or refuse) those already queued, and the future ends.
    pub(super) fn run(
        &self,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let writers = self.writers.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for slot in 0..writers.count {
                tasks.spawn(writers.clone().run(slot, shutdown.clone()));
            }
            while let Some(ended) = tasks.join_next().await {
                if let Err(e) = ended {
                    tracing::error!(error = %e, "a bid writer failed");
                }
            }
        }
    }
}

fn answered(
    answer: Result<Result<Appended, ApiError>, oneshot::error::RecvError>,
) -> Result<Appended, ApiError> {
    answer.unwrap_or_else(|_| {
        Err(ApiError::Unavailable(anyhow::anyhow!(
            "the bid appender stopped before answering"
        )))
    })
}

impl Writers {
    /// One writer: collect a batch when it is this writer's turn, write it,
    /// repeat until the queue is closed and empty.
    async fn run(self: Arc<Self>, slot: usize, shutdown: CancellationToken) {
        loop {
            let mut queue = self.queue.lock().await;
            let next = tokio::select! {
                biased;
                next = queue.recv() => next,
                () = shutdown.cancelled() => {
                    // Take no more bids; the queued ones are still answered.
                    queue.close();
                    queue.recv().await
                }
            };
            let Some(first) = next else { return };
            let Some((client, batch)) = self.take_batch(first, &mut queue).await else {
                continue;
            };
            drop(queue);
            self.write(slot, client, batch).await;
        }
    }

    /// Waits, within the oldest bid's budget, until the database can take a
    /// batch; then takes the batch: that bid and what is queued behind it.
    async fn take_batch(
        &self,
        first: Submission,
        queue: &mut mpsc::Receiver<Submission>,
    ) -> Option<(Object, Vec<Submission>)> {
        if first.withdrawn() {
            return None;
        }
        if !self.unstalled(first.budget).await {
            first.refuse(&self.pool, &self.admission);
            return None;
        }
        // The bids' waits are recorded as theirs, not as the writer's.
        match self.pool.get_before_on_behalf(first.budget).await {
            Ok(client) => {
                let now = Instant::now();
                let batch = collect(first, queue, self.batch_max, self.sinks(), now);
                let waits = batch
                    .iter()
                    .map(|s| now.saturating_duration_since(s.queued_at));
                self.admission.taken(waits);
                (!batch.is_empty()).then_some((client, batch))
            }
            // No connection within the oldest bid's budget: that bid is shed,
            // the younger ones wait on.
            Err(PoolError::Timeout(TimeoutType::Wait)) => {
                first.refuse(&self.pool, &self.admission);
                None
            }
            // The database cannot be reached: the batch fails as its
            // statement would have.
            Err(e) => {
                let failure = Arc::new(e);
                let now = Instant::now();
                for submission in collect(first, queue, self.batch_max, self.sinks(), now) {
                    submission.answer(Err(failure.clone().into()));
                }
                None
            }
        }
    }

    /// Where a batch's bids report their waits and refusals.
    fn sinks(&self) -> (&Pool, &Admission) {
        (&self.pool, &self.admission)
    }

    /// Waits until no batch is stalled; false if `budget` runs out first.
    async fn unstalled(&self, budget: Instant) -> bool {
        loop {
            let done = self.batch_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if !stalled(
                &self.in_flight.lock().expect("in-flight lock"),
                Instant::now(),
            ) {
                return true;
            }
            tokio::select! {
                () = done => {}
                () = tokio::time::sleep_until(budget.into()) => return false,
            }
        }
    }

    /// Frees `slot`: its batch is no longer in flight.
    fn batch_ended(&self, slot: usize) {
        self.in_flight.lock().expect("in-flight lock")[slot] = None;
        self.batch_done.notify_waiters();
    }

    /// Writes `batch` on `client` and answers each of its bids; tells
    /// admission how long its oldest bid took.
    async fn write(&self, slot: usize, client: Object, batch: Vec<Submission>) {
        let oldest = batch.iter().map(|s| s.queued_at).min();
        let size = batch.len();
        self.write_batch(slot, client, batch).await;
        if let Some(oldest) = oldest {
            self.admission.written(size, oldest.elapsed());
        }
    }

    async fn write_batch(&self, slot: usize, client: Object, batch: Vec<Submission>) {
        self.in_flight.lock().expect("in-flight lock")[slot] = Some(Instant::now());
        let bids: Vec<&NewBid> = batch.iter().map(|s| &s.bid).collect();
        let Ok((outcomes, wal_position)) =
            tokio::time::timeout(self.write_limit, append_all(&client, &bids)).await
        else {
            // The statement (or the position read with it) outlived its
            // own timeout: a commit waiting on a stalled disk, or a
            // connection gone silent. Whether it committed is unknown, so
            // its bids are answered 503 and a retry with the same key
            // replays whatever did; the connection is not trusted again,
            // and the other writers go on.
            tracing::warn!(
                bids = batch.len(),
                "an append batch outlived the statement timeout; its outcome is unknown"
            );
            drop(Object::take(client));
            self.batch_ended(slot);
            for submission in batch {
                submission.answer(Err(ApiError::Unavailable(anyhow::anyhow!(
                    "an append batch did not finish within {:?}",
                    self.write_limit
                ))));
            }
            return;
        };
        let mut woken = HashSet::new();
        for outcome in &outcomes {
            if let Ok(Append::Inserted(bid)) = outcome {
                if woken.insert(bid.auction_id) {
                    self.signals.bid_appended(bid.auction_id);
                }
            }
        }
        if !woken.is_empty() {
            self.signals.bids_committed();
        }
        // Committed: from here on nothing may fail these bids' requests.
        self.batch_ended(slot);
        for (submission, outcome) in batch.into_iter().zip(outcomes) {
            submission.answer(
                outcome
                    .map(|appended| Appended {
                        appended,
                        wal_position,
                    })
                    .map_err(ApiError::from),
            );
        }
    }
}

/// Takes `first` and what is queued behind it, up to `max` bids: withdrawn
/// bids are dropped, bids past their budget refused; the rest are claimed.
fn collect(
    first: Submission,
    queue: &mut mpsc::Receiver<Submission>,
    max: usize,
    (pool, admission): (&Pool, &Admission),
    now: Instant,
) -> Vec<Submission> {
    let mut batch = Vec::new();
    let mut next = Some(first);
    while let Some(submission) = next {
        if submission.budget <= now {
            submission.refuse(pool, admission);
        } else if submission.claim(pool, WaitEnd::Served) {
            batch.push(submission);
        }
        if batch.len() >= max {
            break;
        }
        next = queue.try_recv().ok();
    }
    batch
}

/// Whether some batch of `in_flight` has run for longer than [`STALL`].
fn stalled(in_flight: &[Option<Instant>], now: Instant) -> bool {
    in_flight
        .iter()
        .flatten()
        .any(|started| now.saturating_duration_since(*started) > STALL)
}

/// Appends `bids`, each bid's outcome in order: one statement, plus one
/// look-up when some keys were taken (should a taken key's bid not be
/// found, it is written in another round). A failure fails
/// only the bids not yet settled: a bid committed by an earlier round keeps
/// its outcome. With the outcomes comes the primary's WAL position after
/// the last statement that returned one: at or above every bid answered.
async fn append_all(
    client: &Object,
    bids: &[&NewBid],
) -> (
    Vec<Result<Append, Arc<tokio_postgres::Error>>>,
    Option<PgLsn>,
) {
    let mut settled: Vec<Option<Append>> = bids.iter().map(|_| None).collect();
    let mut wal_position = None;
    let failure = settle(client, bids, &mut settled, &mut wal_position)
        .await
        .err()
        .map(Arc::new);
    let outcomes = settled
        .into_iter()
        .map(|outcome| match (outcome, &failure) {
            (Some(appended), _) => Ok(appended),
            (None, Some(failure)) => Err(failure.clone()),
            // `settle` returns only once every bid is settled, or failing.
            (None, None) => unreachable!("an append ended with a bid unsettled"),
        })
        .collect();
    (outcomes, wal_position)
}

/// Every statement of a round reads the WAL position in the same round
/// trip as itself; `wal_position` keeps the latest one read.
async fn settle(
    client: &Object,
    bids: &[&NewBid],
    settled: &mut [Option<Append>],
    wal_position: &mut Option<PgLsn>,
) -> Result<(), tokio_postgres::Error> {
    loop {
        let writing = first_use_of_each_key(bids, settled);
        if writing.is_empty() {
            return Ok(());
        }
        metrics::histogram!("gavel_bids_append_batch_size").record(writing.len() as f64);
        let batch: Vec<&NewBid> = writing.iter().map(|&i| bids[i]).collect();
        let (inserted, position) = bids::append_batch(client, &batch).await?;
        *wal_position = position.or(*wal_position);
        settle_inserted(bids, settled, inserted);
        let taken: Vec<usize> = unsettled(settled).collect();
        if taken.is_empty() {
            return Ok(());
        }
        // After the commit, so a key first used in this batch is found too.
        let wanted: Vec<(Uuid, &str, &str)> = taken
            .iter()
            .map(|&i| {
                (
                    bids[i].auction_id,
                    bids[i].bidder_id.as_str(),
                    bids[i].key.as_str(),
                )
            })
            .collect();
        let (found, position) = bids::find_keys(client, &wanted).await?;
        *wal_position = position.or(*wal_position);
        settle_found(bids, settled, &found);
        // A key is taken by a committed bid, and bids are never deleted:
        // every look-up finds its bid, and the next round writes nothing.
    }
}

/// The unsettled bids in order.
fn unsettled(settled: &[Option<Append>]) -> impl Iterator<Item = usize> + '_ {
    settled
        .iter()
        .enumerate()
        .filter(|(_, outcome)| outcome.is_none())
        .map(|(i, _)| i)
}

/// The unsettled bids to write next: the first of each (auction, bidder,
/// key), in order. A repeat of a key within the batch waits for the
/// look-up, which finds the key's first use.
fn first_use_of_each_key(bids: &[&NewBid], settled: &[Option<Append>]) -> Vec<usize> {
    let mut seen = HashSet::new();
    unsettled(settled)
        .filter(|&i| {
            let bid = bids[i];
            seen.insert((bid.auction_id, bid.bidder_id.as_str(), bid.key.as_str()))
        })
        .collect()
}

/// Settles the bids whose rows the statement inserted.
fn settle_inserted(
    bids: &[&NewBid],
    settled: &mut [Option<Append>],
    inserted: Vec<bids::BidRecord>,
) {
    let mut by_id: HashMap<_, _> = inserted.into_iter().map(|bid| (bid.id, bid)).collect();
    for (bid, outcome) in bids.iter().zip(settled.iter_mut()) {
        if outcome.is_none() {
            if let Some(record) = by_id.remove(&bid.id) {
                *outcome = Some(Append::Inserted(record));
            }
        }
    }
}

/// Settles the bids whose key was found taken.
fn settle_found(
    bids: &[&NewBid],
    settled: &mut [Option<Append>],
    found: &HashMap<bids::BidKey, bids::BidRecord>,
) {
    for (bid, outcome) in bids.iter().zip(settled.iter_mut()) {
        if outcome.is_none() {
            let key = (bid.auction_id, bid.bidder_id.clone(), bid.key.clone());
            if let Some(existing) = found.get(&key) {
                *outcome = Some(Append::KeyExists(existing.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use uuid::Uuid;

    fn bid(bidder: &str, key: &str) -> NewBid {
        NewBid {
            auction_id: Uuid::nil(),
            id: Uuid::now_v7(),
            bidder_id: bidder.into(),
            amount: 1_000,
            key: key.into(),
        }
    }

    fn record(bid: &NewBid, seq: i64) -> bids::BidRecord {
        bids::BidRecord {
            auction_id: bid.auction_id,
            id: bid.id,
            seq,
            bidder_id: bid.bidder_id.clone(),
            amount: bid.amount,
            status: crate::domain::BidStatus::Pending,
            reason: None,
            price_after: None,
            received_at: Utc::now(),
            resolved_at: None,
            resolution_no: None,
        }
    }

    /// What a look-up finds of `bid`'s key once `bid` is in the log.
    fn in_log(bid: &NewBid) -> (bids::BidKey, bids::BidRecord) {
        let key = (bid.auction_id, bid.bidder_id.clone(), bid.key.clone());
        (key, record(bid, 1))
    }

    type Answer = oneshot::Receiver<Result<Appended, ApiError>>;

    /// A pool that never connects (none of these tests asks it to).
    fn unconnected_pool() -> Pool {
        let limits = crate::db::SessionLimits {
            connect_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(1),
            lock_timeout: Duration::from_secs(1),
        };
        let settings = crate::db::PoolSettings {
            size: 2,
            wait_timeout: Duration::from_secs(1),
            limits,
            application_name: "gavel-test",
            custom_plans: false,
        };
        crate::db::build_pool("postgres://gavel@127.0.0.1:1/gavel", "test", &settings)
            .expect("a lazily connecting pool")
    }

    fn submission(budget: Instant) -> (Submission, Arc<AtomicBool>, Answer) {
        let claimed = Arc::new(AtomicBool::new(false));
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            bid: bid("alice", "k"),
            queued_at: Instant::now(),
            budget,
            claimed: claimed.clone(),
            reply,
            // Counted as queued, as `append` does.
            waiting: Arc::new(AtomicUsize::new(1)),
        };
        (submission, claimed, answer)
    }

    #[test]
    fn a_repeated_key_is_written_once_and_waits_for_the_look_up() {
        let (a1, b1, a2, c1, a1_again) = (
            bid("alice", "1"),
            bid("bob", "1"),
            bid("alice", "2"),
            bid("carol", "1"),
            bid("alice", "1"),
        );
        let bids = [&a1, &b1, &a2, &a1_again, &c1];
        let mut settled: Vec<Option<Append>> = bids.iter().map(|_| None).collect();
        assert_eq!(first_use_of_each_key(&bids, &settled), [0, 1, 2, 4]);

        // Alice's first bid and Carol's are inserted; Bob's key was taken.
        settle_inserted(&bids, &mut settled, vec![record(&c1, 8), record(&a1, 7)]);
        assert!(matches!(settled[0], Some(Append::Inserted(ref r)) if r.id == a1.id));
        assert!(matches!(settled[4], Some(Append::Inserted(ref r)) if r.id == c1.id));
        assert_eq!(unsettled(&settled).collect::<Vec<_>>(), [1, 2, 3]);

        // The look-up finds Bob's earlier bid and Alice's first use of "1";
        // should Alice's "2" not be found, it is written again.
        let found = HashMap::from([in_log(&bid("bob", "1")), in_log(&a1)]);
        settle_found(&bids, &mut settled, &found);
        assert!(matches!(settled[3], Some(Append::KeyExists(ref k)) if k.id == a1.id));
        assert!(matches!(settled[1], Some(Append::KeyExists(_))));
        assert_eq!(first_use_of_each_key(&bids, &settled), [2]);
    }

    #[test]
    fn the_first_use_of_a_key_in_the_batch_is_the_one_written() {
        let (first, second, third) = (bid("dave", "x"), bid("dave", "x"), bid("dave", "x"));
        let bids = [&first, &second, &third];
        let settled: Vec<Option<Append>> = bids.iter().map(|_| None).collect();
        assert_eq!(first_use_of_each_key(&bids, &settled), [0]);
    }

    #[test]
    fn a_key_on_another_auction_is_another_bid() {
        let here = bid("erin", "k");
        let there = NewBid {
            auction_id: Uuid::now_v7(),
            ..bid("erin", "k")
        };
        let bids = [&here, &there];
        let mut settled: Vec<Option<Append>> = bids.iter().map(|_| None).collect();
        assert_eq!(first_use_of_each_key(&bids, &settled), [0, 1]);
        // Found taken, each key settles its own bid only.
        let found = HashMap::from([in_log(&there)]);
        settle_found(&bids, &mut settled, &found);
        assert!(settled[0].is_none());
        assert!(matches!(settled[1], Some(Append::KeyExists(ref k)) if k.id == there.id));
    }

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_up_to_the_maximum_and_skips_the_withdrawn() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let (queue, mut receiver) = mpsc::channel(16);
        let (first, _, _first_answer) = submission(later);
        let (withdrawn, withdrawn_claim, _withdrawn_answer) = submission(later);
        withdrawn_claim.store(true, Ordering::Release);
        let (expired, _, expired_answer) = submission(now);
        let (kept, kept_claim, _kept_answer) = submission(later);
        let (fourth, _, _fourth_answer) = submission(later);
        let (left, left_claim, _left_answer) = submission(later);
        for s in [withdrawn, expired, kept, fourth, left] {
            assert!(queue.try_send(s).is_ok());
        }

        let admission = Admission::new();
        let batch = collect(
            first,
            &mut receiver,
            3,
            (&unconnected_pool(), &admission),
            now,
        );
        assert_eq!(batch.len(), 3, "first, kept and fourth");
        assert!(kept_claim.load(Ordering::Acquire), "taken bids are claimed");
        // The expired bid was answered overloaded, never written.
        let refusal = expired_answer.await.expect("an answer");
        assert!(matches!(refusal, Err(ApiError::Overloaded)));
        // A full batch leaves the rest queued, unclaimed.
        assert!(!left_claim.load(Ordering::Acquire));
        assert!(receiver.try_recv().is_ok());
    }

    #[test]
    fn only_a_batch_in_flight_for_long_is_a_stall() {
        let now = Instant::now();
        assert!(!stalled(&[None, None], now));
        assert!(!stalled(&[Some(now - STALL / 2), None], now));
        assert!(stalled(&[None, Some(now - STALL * 2)], now));
    }
}
