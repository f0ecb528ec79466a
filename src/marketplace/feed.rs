//! The admin feed's reading: a page of events after a cursor, held open
//! (`Prefer: wait`) until an event arrives, woken by the resolver's
//! announcements (local or over LISTEN/NOTIFY) and polling meanwhile,
//! since an event becomes readable only once every older transaction has
//! ended, which no announcement reports.

use std::time::Duration;

use tokio::time::Instant;

use super::{Cursor, Event};
use crate::db::marketplace::{self, watermark};
use crate::db::Pool;
use crate::error::ApiError;
use crate::signals::Signals;

/// Most events in one page.
pub const MAX_LIMIT: i64 = 1_000;
/// Most seconds an empty page may be held open.
pub const MAX_WAIT_S: u64 = 30;
/// How often a held page re-reads the log without an announcement.
const POLL: Duration = Duration::from_millis(250);
/// The shortest pause between two reads of a held page.
const MIN_GAP: Duration = Duration::from_millis(25);

/// The feed over the event log. Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    pool: Pool,
    signals: Signals,
}

/// One page: its events and where the next one starts.
#[derive(Debug)]
pub struct FeedPage {
    /// The events, in commit order.
    pub items: Vec<Event>,
    /// The cursor of the next page (also of an empty one).
    pub next: Cursor,
}

impl Feed {
    /// A feed reading through `pool`, woken by `signals`.
    pub fn new(pool: Pool, signals: Signals) -> Self {
        Feed { pool, signals }
    }

    /// At most `limit` events after `after` (from the oldest kept without
    /// it), waiting up to `wait` for one when there are none. An `after`
    /// naming nothing the log knows is refused.
    pub async fn page(
        &self,
        after: Option<Cursor>,
        limit: i64,
        wait: Duration,
    ) -> Result<FeedPage, ApiError> {
        let from = after.map_or(marketplace::START, |c| c.0);
        if after.is_some() && !marketplace::knows(&self.pool.get().await?, from).await? {
            return Err(ApiError::InvalidRequest(
                "after names no position of this feed still kept".into(),
            ));
        }
        let deadline = Instant::now() + wait;
        let mut announced = self.signals.subscribe();
        loop {
            let page = self.read(from, limit).await?;
            if !page.items.is_empty() || Instant::now() >= deadline {
                return Ok(page);
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline.min(Instant::now() + POLL)) => {}
                _ = announced.recv() => {}
            }
            // Announcements come every few milliseconds in a final minute.
            tokio::time::sleep_until(deadline.min(Instant::now() + MIN_GAP)).await;
            announced = announced.resubscribe();
        }
    }

    /// One read: the events, and a cursor past them (past everything final
    /// when there are none).
    async fn read(
        &self,
        from: crate::db::events::Position,
        limit: i64,
    ) -> Result<FeedPage, ApiError> {
        let client = self.pool.get().await?;
        let (horizon, rows) = marketplace::page(&client, from, limit).await?;
        let next = match rows.last() {
            Some(last) => last.position,
            None => watermark(horizon).max(from),
        };
        Ok(FeedPage {
            items: rows.iter().map(Event::from).collect(),
            next: Cursor(next),
        })
    }
}
