//! Live auction views: one feed per watched auction per process. A change
//! resolved in this process comes with its committed view; one announced
//! through LISTEN/NOTIFY by another process is read once per process, from
//! the view cache or through read routing. Either is published to every
//! watcher of that auction through a `watch` channel: a watcher that reads
//! slowly skips to the latest view and never holds up the others. Watchers
//! hold no database connection, and a feed lives only while watched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch, Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::pace::{self, Pace, Pacer};
use crate::config::Limits;
use crate::db::auction_cache::AuctionCache;
use crate::db::auctions::AuctionRecord;
use crate::error::ApiError;
use crate::signals::{Resolved, Signals};

/// How often every feed reads its auction again even when no change was
/// announced: the safety net under a lost notification.
const POLL: Duration = Duration::from_secs(1);
/// The first wait before reading again a view older than an announced
/// change (a replica that has not replayed it yet); it doubles up to
/// [`GIVE_UP`], after which the poll takes over.
const FIRST_RETRY: Duration = Duration::from_millis(5);
const GIVE_UP: Duration = Duration::from_millis(1_000);
/// Masking classes a view is rendered for (see [`Snapshot::rendered`]).
pub const CLASSES: usize = 3;

/// One version of an auction's view, shared by all its watchers.
pub struct Snapshot {
    /// The auction as read.
    pub auction: Arc<AuctionRecord>,
    /// The event each masking class receives (up to its `server_time`,
    /// added at each send), rendered by the first watcher
    /// of that class and reused by the others.
    pub rendered: [OnceLock<Bytes>; CLASSES],
    /// When this process learned of the change (its announcement, which
    /// follows the commit within milliseconds, or the read that found it).
    pub changed_at: Instant,
}

impl Snapshot {
    fn new(auction: Arc<AuctionRecord>, changed_at: Instant) -> Arc<Self> {
        Arc::new(Snapshot {
            auction,
            rendered: Default::default(),
            changed_at,
        })
    }

    /// The auction's version.
    pub fn version(&self) -> i64 {
        self.auction.version
    }
}

/// The live views of this process. Cheap to clone.
#[derive(Clone)]
pub struct LiveViews {
    inner: Arc<Inner>,
}

struct Inner {
    views: AuctionCache,
    feeds: Mutex<HashMap<Uuid, Weak<Feed>>>,
    pace: Pace,
}

/// A watcher's hold on one auction's feed and on a stream slot.
pub struct Watch {
    /// The latest view; `changed()` wakes on every later version.
    pub views: watch::Receiver<Arc<Snapshot>>,
    feed: Arc<Feed>,
    pacer: Pacer,
    _slot: OwnedSemaphorePermit,
}

impl Watch {
    /// How long this watcher waits after an event before the next one (see
    /// [`pace`](super::pace)); `None`: no pause.
    pub fn pause(&mut self) -> Option<Duration> {
        self.pacer.pause()
    }

    /// Waits out a pause until `until` after sending version `sent`. It
    /// ends early when a newer version goes quiet and the reserve allows,
    /// and at once when the auction closes: its final view is never held.
    pub async fn paused(&mut self, until: tokio::time::Instant, sent: i64) {
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = self.feed.closed.cancelled() => {}
            () = self.pacer.quiet_above(sent) => {}
        }
    }
}

struct Feed {
    id: Uuid,
    latest: watch::Sender<Arc<Snapshot>>,
    /// Cancelled once a closed view is published.
    closed: CancellationToken,
    /// The latest version once it has stayed the latest for a while.
    quiet: watch::Sender<i64>,
    /// Notified at each publication (and when the feed goes).
    published: Arc<Notify>,
    refresh: Mutex<Refresh>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        // Ends its `mark_quiet` task.
        self.published.notify_one();
    }
}

/// The reads a feed still owes: until its view reaches `wanted`, a change
/// first announced at `since`.
#[derive(Default)]
struct Refresh {
    running: bool,
    wanted: i64,
    since: Option<Instant>,
}

impl LiveViews {
    /// Live views read through `views`, following the changes `signals`
    /// announces until `shutdown`, for the streams `limits` allow.
    pub fn new(
        views: AuctionCache,
        signals: &Signals,
        limits: &Limits,
        shutdown: CancellationToken,
    ) -> Self {
        let (max_streams, events_per_s) = (limits.max_streams, limits.stream_events_per_s);
        register_metrics();
        let inner = Arc::new(Inner {
            views,
            feeds: Mutex::new(HashMap::new()),
            pace: Pace::new(max_streams, events_per_s, signals.clone()),
        });
        tokio::spawn(follow(
            Arc::downgrade(&inner),
            signals.subscribe(),
            shutdown,
        ));
        LiveViews { inner }
    }

    /// Starts watching auction `id`: `Ok(None)` when there is no such
    /// auction, `Overloaded` when every stream slot is taken.
    pub async fn watch(&self, id: Uuid) -> Result<Option<Watch>, ApiError> {
        let slot = self.stream_slot()?;
        let feed = match self.inner.feed(id) {
            Some(feed) => feed,
            None => {
                let (auction, _) = self.inner.views.get(id, None).await?;
                let Some(auction) = auction else {
                    return Ok(None);
                };
                self.inner.adopt(id, auction)
            }
        };
        let seed = Uuid::new_v4().as_u64_pair().0;
        Ok(Some(Watch {
            views: feed.latest.subscribe(),
            pacer: Pacer::new(self.inner.pace.clone(), feed.quiet.subscribe(), seed),
            feed,
            _slot: slot,
        }))
    }

    /// A place among the `GAVEL_MAX_STREAMS` streams of this process, held
    /// while a stream (of any kind) is open; `Overloaded` when none is left.
    pub fn stream_slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        let slots = self.inner.pace.streams().clone();
        slots.try_acquire_owned().map_err(|_| {
            metrics::counter!("gavel_streams_refused_total").increment(1);
            ApiError::Overloaded
        })
    }
}

impl Inner {
    fn feed(&self, id: Uuid) -> Option<Arc<Feed>> {
        self.feeds
            .lock()
            .expect("feeds")
            .get(&id)
            .and_then(Weak::upgrade)
    }

    /// The feed of `id`, made from `auction` unless another watcher made
    /// one meanwhile (then it keeps the newer view of the two).
    fn adopt(&self, id: Uuid, auction: Arc<AuctionRecord>) -> Arc<Feed> {
        let mut feeds = self.feeds.lock().expect("feeds");
        if let Some(feed) = feeds.get(&id).and_then(Weak::upgrade) {
            feed.publish(auction, Instant::now());
            return feed;
        }
        let closed = CancellationToken::new();
        if auction.state.closed {
            closed.cancel();
        }
        let feed = Arc::new(Feed {
            id,
            quiet: watch::channel(auction.version).0,
            latest: watch::channel(Snapshot::new(auction, Instant::now())).0,
            closed,
            published: Arc::new(Notify::new()),
            refresh: Mutex::new(Refresh::default()),
        });
        feeds.insert(id, Arc::downgrade(&feed));
        tokio::spawn(pace::mark_quiet(
            Arc::downgrade(&feed),
            feed.published.clone(),
            Feed::mark_quiet,
        ));
        feed
    }

    fn live_feeds(&self) -> Vec<Arc<Feed>> {
        let mut feeds = self.feeds.lock().expect("feeds");
        feeds.retain(|_, feed| feed.strong_count() > 0);
        feeds.values().filter_map(Weak::upgrade).collect()
    }
}

/// Follows the announced changes: each one wakes its auction's feed, and
/// every feed is read again each [`POLL`] in case an announcement was lost.
async fn follow(
    inner: Weak<Inner>,
    mut changes: broadcast::Receiver<Resolved>,
    shutdown: CancellationToken,
) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let change = tokio::select! {
            () = shutdown.cancelled() => return,
            change = changes.recv() => Some(change),
            _ = poll.tick() => None,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match change {
            Some(Ok(change)) => {
                let Some(feed) = inner.feed(change.auction_id) else {
                    continue;
                };
                match change.view {
                    // Committed by this process: nothing to read.
                    Some(view) => {
                        feed.publish(view, Instant::now());
                    }
                    None => {
                        let wanted = change.version.unwrap_or(feed.version() + 1);
                        feed.refresh(&inner.views, wanted);
                    }
                }
            }
            Some(Err(RecvError::Closed)) => return,
            // Missed announcements, or the poll: read every feed again.
            Some(Err(RecvError::Lagged(_))) | None => {
                inner.pace.record();
                for feed in inner.live_feeds() {
                    feed.refresh(&inner.views, feed.version());
                }
            }
        }
    }
}

impl Feed {
    fn version(&self) -> i64 {
        self.latest.borrow().version()
    }

    /// Publishes `auction`, a change learned of at `since`, if it is newer
    /// than the view watchers have.
    fn publish(&self, auction: Arc<AuctionRecord>, since: Instant) -> bool {
        let closed = auction.state.closed;
        let published = self.latest.send_if_modified(|latest| {
            if auction.version <= latest.version() {
                return false;
            }
            *latest = Snapshot::new(auction, since);
            metrics::counter!("gavel_stream_versions_total").increment(1);
            true
        });
        if published {
            self.published.notify_one();
            if closed {
                self.closed.cancel();
            }
        }
        published
    }

    fn mark_quiet(&self) {
        self.quiet.send_replace(self.version());
    }

    /// Reads the auction until its view reaches version `wanted`, one read
    /// at a time however many changes are announced meanwhile.
    fn refresh(self: &Arc<Self>, views: &AuctionCache, wanted: i64) {
        {
            let mut refresh = self.refresh.lock().expect("refresh");
            if wanted > self.version() {
                refresh.since.get_or_insert_with(Instant::now);
            }
            refresh.wanted = refresh.wanted.max(wanted);
            if refresh.running {
                return;
            }
            refresh.running = true;
        }
        tokio::spawn(self.clone().read_until_current(views.clone()));
    }

    async fn read_until_current(self: Arc<Self>, views: AuctionCache) {
        let mut retry = FIRST_RETRY;
        loop {
            match views.get(self.id, None).await {
                Ok((Some(auction), _)) => {
                    let since = self.refresh.lock().expect("refresh").since;
                    if self.publish(auction, since.unwrap_or_else(Instant::now)) {
                        self.refresh.lock().expect("refresh").since = None;
                    }
                }
                Ok((None, _)) => {}
                Err(e) => tracing::debug!(auction = %self.id, error = %e, "live view read failed"),
            }
            {
                let mut refresh = self.refresh.lock().expect("refresh");
                let done = self.version() >= refresh.wanted || self.latest.is_closed();
                if done || retry > GIVE_UP {
                    refresh.running = false;
                    return;
                }
            }
            tokio::time::sleep(retry).await;
            retry *= 2;
        }
    }
}

fn register_metrics() {
    metrics::counter!("gavel_stream_versions_total").increment(0);
    metrics::counter!("gavel_streams_refused_total").increment(0);
    metrics::counter!("gavel_stream_versions_skipped_total").increment(0);
    metrics::gauge!("gavel_streams_open").increment(0.0);
    metrics::gauge!("gavel_stream_pause_seconds").set(0.0);
    for event in ["auction", "end", "bid"] {
        metrics::counter!("gavel_stream_events_total", "event" => event).increment(0);
    }
}
