//! A micro-cache of auction reads. In an auction's last minute its view is
//! polled by every client watching it, hundreds of times a second; each
//! poll without a consistency token may be served from a view read a
//! moment ago instead of from the database.
//!
//! The read contract holds:
//! - A cached view is served for at most `GAVEL_READ_CACHE_MS`, and only
//!   while every write it misses is younger than the replica lag bound,
//!   the staleness a token-less read may have anyway.
//! - A read with a consistency token is served from the cache only when
//!   the cached read had already seen the token's WAL position.
//! - A change this process makes or hears of (a resolution, the
//!   resolver's or one announced by another process; an auction opening)
//!   evicts the auction's view at once, so in one process a client sees a
//!   resolution as soon as the request that waited for it does. A read that
//!   was under way when its auction changed is not cached, and a view
//!   older than the version a change of this process announced (from a
//!   replica that has not replayed the change yet) is kept for 20 ms only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio_postgres::types::PgLsn;
use uuid::Uuid;

use super::auctions::{self, AuctionRecord};
use super::reads::{ReadSource, Reads};
use crate::error::ApiError;
use crate::signals::{Resolved, Signals};

/// Auctions kept before the cache is emptied.
const CAPACITY: usize = 10_000;
/// How long a view older than a change this process announced is kept: a
/// replica that has not replayed the change yet gives such views for a few
/// milliseconds, and under load there is a change every few milliseconds,
/// so refusing them would leave a hot auction uncached; keeping them
/// briefly reads the auction again soon after the replica catches up.
const BEHIND_TTL: Duration = Duration::from_millis(20);

/// Auction views recently read, shared by the process's requests. Cheap to clone.
#[derive(Clone)]
pub struct AuctionCache {
    inner: Arc<Inner>,
}

struct Inner {
    reads: Reads,
    ttl: Duration,
    state: Mutex<State>,
}

struct State {
    views: Views,
    /// Changes to apply before the next lookup.
    changes: broadcast::Receiver<Resolved>,
}

impl AuctionCache {
    /// A cache in front of `reads` keeping views for `ttl` (zero: no cache),
    /// evicting the auctions `signals` announce as changed.
    pub fn new(reads: Reads, signals: &Signals, ttl: Duration) -> Self {
        register_metrics();
        AuctionCache {
            inner: Arc::new(Inner {
                reads,
                ttl,
                state: Mutex::new(State {
                    views: Views::default(),
                    changes: signals.subscribe(),
                }),
            }),
        }
    }

    /// The auction `id`, from the cache when a cached view may serve a read
    /// with `token`, else through read routing.
    pub async fn get(
        &self,
        id: Uuid,
        token: Option<PgLsn>,
    ) -> Result<(Option<Arc<AuctionRecord>>, ReadSource), ApiError> {
        let inner = &self.inner;
        if inner.ttl.is_zero() {
            let (auction, source) = self.read(id, token).await?;
            return Ok((auction.map(Arc::new), source));
        }
        let limits = Limits {
            ttl: inner.ttl,
            max_lag: inner.reads.max_lag(),
        };
        let covers = |seen: PgLsn, token: PgLsn| inner.reads.covers(seen, token);
        let generation = {
            let mut state = self.lock();
            match state
                .views
                .lookup(id, token, Instant::now(), limits, covers)
            {
                Lookup::Hit(view) => {
                    metrics::counter!("gavel_auction_cache_total", "result" => "hit").increment(1);
                    return Ok((Some(view.auction.clone()), view.source));
                }
                Lookup::Miss(generation) => generation,
            }
        };
        metrics::counter!("gavel_auction_cache_total", "result" => "miss").increment(1);
        let (auction, source) = self.read(id, token).await?;
        let auction = auction.map(Arc::new);
        let mut state = self.lock();
        match &auction {
            Some(auction) => state.views.store(id, generation, auction.clone(), source),
            None => state.views.forget(id),
        }
        Ok((auction, source))
    }

    async fn read(
        &self,
        id: Uuid,
        token: Option<PgLsn>,
    ) -> Result<(Option<AuctionRecord>, ReadSource), ApiError> {
        self.inner
            .reads
            .run(token, |client| Box::pin(auctions::get(client, id)))
            .await
    }

    /// The state, with every change announced so far applied.
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.inner.state.lock().expect("auction cache lock");
        let State { views, changes } = &mut *state;
        loop {
            match changes.try_recv() {
                Ok(change) => views.evict(change.auction_id, change.version),
                // Changes were missed: any view may be out of date.
                Err(TryRecvError::Lagged(_)) => views.clear(),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        state
    }
}

fn register_metrics() {
    for result in ["hit", "miss"] {
        metrics::counter!("gavel_auction_cache_total", "result" => result).increment(0);
    }
}

/// How long a cached view may serve reads.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Since it was read.
    ttl: Duration,
    /// Since the newest write it is sure to hold.
    max_lag: Duration,
}

/// A view as read, with where and when.
#[derive(Debug, Clone)]
struct View {
    auction: Arc<AuctionRecord>,
    source: ReadSource,
    read_at: Instant,
    /// Older than a change announced when it was stored.
    behind: bool,
}

/// One auction's place in the cache. `generation` counts the changes seen,
/// so a read that started before a change is not stored after it;
/// `min_version` is the newest version a change announced, so a view from
/// a replica that has not replayed it yet is kept only briefly.
#[derive(Debug, Default)]
struct Slot {
    generation: u64,
    min_version: i64,
    view: Option<View>,
}

enum Lookup<'a> {
    Hit(&'a View),
    /// Read it, then store it under this generation.
    Miss(u64),
}

/// The cached views, without the reading (kept apart to be tested alone).
#[derive(Debug, Default)]
struct Views {
    slots: HashMap<Uuid, Slot>,
}

impl Views {
    fn lookup(
        &mut self,
        id: Uuid,
        token: Option<PgLsn>,
        now: Instant,
        limits: Limits,
        covers: impl Fn(PgLsn, PgLsn) -> bool,
    ) -> Lookup<'_> {
        let slot = self.slot(id);
        let usable = slot.view.as_ref().is_some_and(|view| {
            let ttl = if view.behind {
                limits.ttl.min(BEHIND_TTL)
            } else {
                limits.ttl
            };
            now.saturating_duration_since(view.read_at) < ttl
                && now.saturating_duration_since(view.source.fresh_at) <= limits.max_lag
                && token.is_none_or(|token| {
                    view.source.position.is_some_and(|seen| covers(seen, token))
                })
        });
        match &slot.view {
            Some(view) if usable => Lookup::Hit(view),
            _ => Lookup::Miss(slot.generation),
        }
    }

    /// `id`'s slot, made if need be; a full cache is emptied first.
    fn slot(&mut self, id: Uuid) -> &mut Slot {
        if self.slots.len() >= CAPACITY && !self.slots.contains_key(&id) {
            self.slots.clear();
        }
        self.slots.entry(id).or_default()
    }

    /// Keeps `auction` as read in `generation`, unless the auction changed
    /// since or a newer version is already kept; briefly when it is older
    /// than a change announced.
    fn store(
        &mut self,
        id: Uuid,
        generation: u64,
        auction: Arc<AuctionRecord>,
        source: ReadSource,
    ) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        if let Some(kept) = &slot.view {
            if kept.auction.version > auction.version {
                return;
            }
        }
        slot.view = Some(View {
            behind: auction.version < slot.min_version,
            auction,
            source,
            read_at: Instant::now(),
        });
    }

    /// The auction changed, to `version` when known.
    fn evict(&mut self, id: Uuid, version: Option<i64>) {
        let slot = self.slot(id);
        slot.generation += 1;
        slot.view = None;
        slot.min_version = slot.min_version.max(version.unwrap_or(0));
    }

    fn forget(&mut self, id: Uuid) {
        self.slots.remove(&id);
    }

    /// Drops every view; reads under way find no slot and store nothing.
    fn clear(&mut self) {
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::db::reads::Target;
    use crate::rules::{AuctionState, AuctionTerms, Increments};

    const LIMITS: Limits = Limits {
        ttl: Duration::from_millis(250),
        max_lag: Duration::from_secs(2),
    };

    fn auction(id: Uuid, version: i64) -> Arc<AuctionRecord> {
        let now = Utc::now();
        Arc::new(AuctionRecord {
            id,
            title: "Dragon scale".into(),
            currency: "EUR".into(),
            terms: AuctionTerms {
                seller_id: "seller".into(),
                starting_price: 1_000,
                reserve_price: None,
                increments: Increments::default_table(),
                starts_at: now,
                soft_close: chrono::Duration::zero(),
                max_end_at: now,
            },
            original_ends_at: now,
            soft_close_s: 0,
            state: AuctionState::opening(now),
            resolved_count: 0,
            winner_id: None,
            version,
        })
    }

    fn source(position: u64, fresh_at: Instant) -> ReadSource {
        ReadSource {
            target: Target::Replica,
            position: Some(PgLsn::from(position)),
            fresh_at,
        }
    }

    fn covers(seen: PgLsn, token: PgLsn) -> bool {
        u64::from(seen) >= u64::from(token)
    }

    /// The version a lookup finds, or `None` on a miss.
    fn found(views: &mut Views, id: Uuid, token: Option<u64>, now: Instant) -> Option<i64> {
        let token = token.map(PgLsn::from);
        match views.lookup(id, token, now, LIMITS, covers) {
            Lookup::Hit(view) => Some(view.auction.version),
            Lookup::Miss(_) => None,
        }
    }

    /// The generation of a lookup that must miss.
    fn miss(views: &mut Views, id: Uuid) -> u64 {
        match views.lookup(id, None, Instant::now(), LIMITS, covers) {
            Lookup::Miss(generation) => generation,
            Lookup::Hit(_) => panic!("expected a miss"),
        }
    }

    /// The view kept for `id`, to alter.
    fn kept(views: &mut Views, id: Uuid) -> &mut View {
        let slot = views.slots.get_mut(&id).expect("a slot");
        slot.view.as_mut().expect("a view")
    }

    /// An empty cache, an auction, and the generation of a read of it under way.
    fn read_under_way() -> (Views, Uuid, u64) {
        let mut views = Views::default();
        let id = Uuid::now_v7();
        let generation = miss(&mut views, id);
        (views, id, generation)
    }

    /// Misses, then stores version `version` as read at `fresh_at`.
    fn fill(views: &mut Views, id: Uuid, version: i64, position: u64, fresh_at: Instant) {
        let generation = miss(views, id);
        views.store(
            id,
            generation,
            auction(id, version),
            source(position, fresh_at),
        );
    }

    #[test]
    fn a_view_serves_reads_for_its_ttl_only() {
        let mut views = Views::default();
        let id = Uuid::now_v7();
        let now = Instant::now();
        assert_eq!(found(&mut views, id, None, now), None, "nothing cached yet");
        fill(&mut views, id, 3, 100, now);
        assert_eq!(found(&mut views, id, None, Instant::now()), Some(3));
        let later = Instant::now() + LIMITS.ttl;
        assert_eq!(found(&mut views, id, None, later), None, "expired");
    }

    #[test]
    fn a_view_is_never_staler_than_the_lag_bound() {
        let mut views = Views::default();
        let id = Uuid::now_v7();
        // Read from a replica that was already as stale as allowed.
        let fresh_at = Instant::now();
        fill(&mut views, id, 3, 100, fresh_at);
        let near_bound = fresh_at + LIMITS.max_lag;
        // As if the read had ended just before the bound.
        kept(&mut views, id).read_at = near_bound - Duration::from_millis(10);
        assert_eq!(
            found(&mut views, id, None, near_bound),
            Some(3),
            "within both limits"
        );
        assert_eq!(
            found(&mut views, id, None, near_bound + Duration::from_millis(1)),
            None,
            "within the TTL but past the lag bound"
        );
    }

    #[test]
    fn a_token_read_is_served_only_by_a_view_that_saw_the_token() {
        let mut views = Views::default();
        let id = Uuid::now_v7();
        fill(&mut views, id, 3, 100, Instant::now());
        let now = Instant::now();
        assert_eq!(found(&mut views, id, Some(100), now), Some(3));
        assert_eq!(found(&mut views, id, Some(99), now), Some(3));
        assert_eq!(found(&mut views, id, Some(101), now), None, "token ahead");
        kept(&mut views, id).source.position = None;
        assert_eq!(
            found(&mut views, id, Some(1), now),
            None,
            "unknown position"
        );
        assert_eq!(found(&mut views, id, None, now), Some(3), "no token");
    }

    #[test]
    fn a_change_evicts_the_view_and_a_read_from_before_it_is_not_kept() {
        let mut views = Views::default();
        let (id, other) = (Uuid::now_v7(), Uuid::now_v7());
        fill(&mut views, id, 3, 100, Instant::now());
        fill(&mut views, other, 7, 100, Instant::now());
        views.evict(id, None);
        let now = Instant::now();
        assert_eq!(found(&mut views, id, None, now), None, "evicted");
        assert_eq!(found(&mut views, other, None, now), Some(7), "others stay");

        // A read starts, the auction changes, the read ends.
        let before = miss(&mut views, id);
        views.evict(id, None);
        views.store(id, before, auction(id, 3), source(100, now));
        assert_eq!(found(&mut views, id, None, Instant::now()), None);

        // A read that started after the change is kept.
        fill(&mut views, id, 4, 200, Instant::now());
        assert_eq!(found(&mut views, id, None, Instant::now()), Some(4));
    }

    #[test]
    fn a_view_older_than_an_announced_change_is_kept_only_briefly() {
        let mut views = Views::default();
        let id = Uuid::now_v7();
        fill(&mut views, id, 3, 100, Instant::now());
        // The resolver committed version 4; the replica has not replayed it.
        views.evict(id, Some(4));
        fill(&mut views, id, 3, 100, Instant::now());
        let stored = kept(&mut views, id).read_at;
        assert_eq!(found(&mut views, id, None, stored), Some(3), "kept");
        assert_eq!(
            found(&mut views, id, None, stored + BEHIND_TTL),
            None,
            "but only briefly"
        );
        // Once the replica has it, the view is kept for the whole TTL.
        kept(&mut views, id).read_at = stored - BEHIND_TTL;
        fill(&mut views, id, 4, 200, Instant::now());
        let stored = kept(&mut views, id).read_at;
        assert_eq!(found(&mut views, id, None, stored + BEHIND_TTL), Some(4));
        // An announcement without a version lowers nothing.
        views.evict(id, None);
        fill(&mut views, id, 3, 100, Instant::now());
        let stored = kept(&mut views, id).read_at;
        assert_eq!(found(&mut views, id, None, stored + BEHIND_TTL), None);
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        let (mut views, id, generation) = read_under_way();
        let now = Instant::now();
        // Two reads under way at once; the newer answer lands first.
        views.store(id, generation, auction(id, 5), source(200, now));
        views.store(id, generation, auction(id, 4), source(100, now));
        assert_eq!(found(&mut views, id, None, Instant::now()), Some(5));
    }

    #[test]
    fn reads_under_way_store_nothing_after_a_clear_and_a_full_cache_empties() {
        let (mut views, id, generation) = read_under_way();
        let now = Instant::now();
        views.clear();
        views.store(id, generation, auction(id, 3), source(100, now));
        assert!(views.slots.is_empty(), "missed changes: nothing kept");

        for _ in 0..CAPACITY {
            fill(&mut views, Uuid::now_v7(), 1, 100, now);
        }
        assert_eq!(views.slots.len(), CAPACITY);
        fill(&mut views, id, 3, 100, now);
        assert_eq!(views.slots.len(), 1, "emptied before growing past capacity");
        assert_eq!(found(&mut views, id, None, Instant::now()), Some(3));
    }
}
