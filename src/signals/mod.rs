//! In-process signals between the bid path and the resolver: which auctions
//! have new bids (wake the resolver) and which bids were just resolved (wake
//! requests waiting with `Prefer: wait`), and for the live views whether
//! the process is taking bids.

pub mod listener;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, Notify};
use uuid::Uuid;

use crate::db::auctions::AuctionRecord;

/// A committed change of an auction's state: a resolution, or its opening.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The auction whose state moved.
    pub auction_id: Uuid,
    /// The bids resolved, when known (none for an opening; a resolution
    /// announced by another process carries only the auction).
    pub bids: Option<Arc<[Uuid]>>,
    /// The auction's version after the change, when known (not for a
    /// change announced by another process).
    pub version: Option<i64>,
    /// The auction as the change committed it, when the writer had it whole
    /// (the resolver's): live views publish it without reading it again.
    pub view: Option<Arc<AuctionRecord>>,
}

impl Resolved {
    /// Whether this resolution may concern `bid_id` of `auction_id`.
    pub fn may_concern(&self, auction_id: Uuid, bid_id: Uuid) -> bool {
        self.auction_id == auction_id
            && self.bids.as_ref().is_none_or(|bids| bids.contains(&bid_id))
    }
}

/// Cheap-to-clone handle shared by the API, the resolver and the listener.
#[derive(Clone)]
pub struct Signals {
    inner: Arc<Inner>,
}

struct Inner {
    /// This process, as named in the notifications it sends.
    instance: Uuid,
    /// Auctions with new pending bids, for the resolver.
    dirty: Marks,
    /// Auctions this process changed, for other processes to hear of.
    changed_here: Marks,
    resolved: broadcast::Sender<Resolved>,
    /// When this process last committed a bid, in µs after `started`.
    last_commit_us: AtomicU64,
    started: Instant,
}

/// A set of auctions marked for a consumer, which takes them all at once
/// and waits when there are none.
#[derive(Default)]
struct Marks {
    auctions: Mutex<HashSet<Uuid>>,
    wake: Notify,
}

impl Marks {
    fn mark(&self, auction_id: Uuid) {
        self.auctions
            .lock()
            .expect("signals lock")
            .insert(auction_id);
        // notify_one keeps a permit when nobody waits, so a mark made while
        // the consumer is busy is not lost.
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Uuid> {
        let mut auctions = self.auctions.lock().expect("signals lock");
        auctions.drain().collect()
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

impl Signals {
    /// Fresh signals with no pending work.
    pub fn new() -> Self {
        let (resolved, _) = broadcast::channel(1024);
        Signals {
            inner: Arc::new(Inner {
                instance: Uuid::new_v4(),
                dirty: Marks::default(),
                changed_here: Marks::default(),
                resolved,
                last_commit_us: AtomicU64::new(0),
                started: Instant::now(),
            }),
        }
    }

    /// Records that `auction_id` has new pending bids and wakes the consumer.
    pub fn bid_appended(&self, auction_id: Uuid) {
        self.inner.dirty.mark(auction_id);
    }

    /// Records that this process just committed bids: it is taking bids,
    /// which the live views spend no reserve on top of (see `live::pace`).
    pub fn bids_committed(&self) {
        let now = self.inner.started.elapsed().as_micros() as u64;
        self.inner
            .last_commit_us
            .store(now.max(1), Ordering::Relaxed);
    }

    /// Whether this process committed bids within the last `within`.
    pub fn bids_committed_within(&self, within: Duration) -> bool {
        let last = self.inner.last_commit_us.load(Ordering::Relaxed);
        let now = self.inner.started.elapsed().as_micros() as u64;
        last != 0 && now.saturating_sub(last) < within.as_micros() as u64
    }

    /// Takes the set of auctions marked since the last call.
    pub fn take_dirty(&self) -> Vec<Uuid> {
        self.inner.dirty.take()
    }

    /// Waits until some auction is marked.
    pub async fn woken(&self) {
        self.inner.dirty.wake.notified().await;
    }

    /// Records that this process committed a change of `auction_id` that
    /// other processes should hear of, for the coalescing forwarder
    /// ([`listener::forward_resolved`]) to announce after the commit.
    pub fn changed_here(&self, auction_id: Uuid) {
        self.inner.changed_here.mark(auction_id);
    }

    /// Takes the set of auctions recorded by [`Signals::changed_here`]
    /// since the last call.
    pub fn take_changed_here(&self) -> Vec<Uuid> {
        self.inner.changed_here.take()
    }

    /// Waits until some auction is recorded by [`Signals::changed_here`].
    pub async fn changed_here_woken(&self) {
        self.inner.changed_here.wake.notified().await;
    }

    /// Subscribes to resolutions (subscribe before appending to miss none).
    pub fn subscribe(&self) -> broadcast::Receiver<Resolved> {
        self.inner.resolved.subscribe()
    }

    /// Announces a committed resolution to waiting requests.
    pub fn publish(&self, resolved: Resolved) {
        // No subscriber is fine: nobody is waiting.
        let _ = self.inner.resolved.send(resolved);
    }

    /// The NOTIFY payload announcing `auction_id` from this process.
    pub fn notification(&self, auction_id: Uuid) -> String {
        format!("{auction_id}:{}", self.inner.instance)
    }

    /// The auction named by a NOTIFY payload, unless this process sent it
    /// (a process never needs its own announcements: it acted on them already).
    pub fn foreign_notification(&self, payload: &str) -> Option<Uuid> {
        let (auction, sender) = payload.split_once(':')?;
        let sender: Uuid = sender.parse().ok()?;
        (sender != self.inner.instance)
            .then(|| auction.parse().ok())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_ignores_its_own_notifications() {
        let (ours, theirs) = (Signals::new(), Signals::new());
        let auction = Uuid::now_v7();
        assert_eq!(ours.foreign_notification(&ours.notification(auction)), None);
        assert_eq!(
            ours.foreign_notification(&theirs.notification(auction)),
            Some(auction)
        );
        assert_eq!(ours.foreign_notification("garbage"), None);
    }
}
