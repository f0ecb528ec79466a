//! The resolver: the only writer of auction state.
//!
//! It takes each auction's pending bids in receipt order, applies the pure
//! [`rules`](crate::rules), and commits the new state with a compare-and-set
//! on `auctions.version` in the same transaction as every bid's outcome.
//! Several processes may run a resolver on one database: a transaction-level
//! advisory lock per auction makes one of them the writer at a time, and the
//! version check keeps a bid from being applied twice even if that lock were
//! bypassed: a bid's outcome is written only while it is still pending,
//! together with the auction's progress through its bids.
//!
//! Auctions with new bids are resolved together, one transaction per group
//! of them (see [`Resolver::resolve_auctions`]); each auction keeps its own
//! lock and its own compare-and-set.
//!
//! Pending work is found by the transactions that wrote it: each auction
//! keeps its progress through its bids in (transaction, sequence) order,
//! with the transactions still open below it (see
//! [`Progress`](crate::db::bids::Progress)), never a sequence watermark,
//! so a bid whose transaction commits late is not skipped.
//!
//! Where things are:
//! - `worker`: the loop (wake-ups, scans, groups of auctions, turns);
//! - `transaction`: one transaction over a group of auctions, in named
//!   steps (read, plan, write, verify, settle, publish);
//! - `plan`: the pure batch planner, which decides what that transaction
//!   writes;
//! - [`BatchSize`], [`ResolveError`], and the metrics (`instruments`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::config::ResolverConfig;
use crate::db::Pool;
use crate::signals::Signals;

mod batch_size;
mod error;
mod instruments;
mod plan;
mod transaction;
mod worker;

pub use batch_size::{BatchSize, BATCH_LIMIT};
pub use error::ResolveError;

/// What one resolution step did for an auction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Idle,
    /// Bids applied (and possibly the auction settled); `more` when pending
    /// bids remain beyond the batch.
    Applied {
        /// Bids resolved in this step.
        bids: usize,
        /// Whether the auction was settled closed.
        settled: bool,
        /// Whether more pending bids remain.
        more: bool,
    },
    /// Another resolver holds this auction right now.
    Busy,
    /// Another writer committed first; nothing was written. Retry.
    Conflict,
}

/// The background resolver of one process.
#[derive(Clone)]
pub struct Resolver {
    pool: Pool,
    signals: Signals,
    settle_grace: Duration,
    /// `settle_grace` as the planner compares it with database times.
    grace: chrono::Duration,
    poll: Duration,
    interval: Duration,
    concurrency: usize,
    /// Auctions with a delayed retry scheduled (one at a time per auction).
    retrying: Arc<Mutex<HashSet<Uuid>>>,
    batch: Arc<BatchSize>,
}

impl Resolver {
    /// A resolver writing through `pool`, woken by `signals`, with the
    /// grace, polling and round interval of `config`.
    pub fn new(pool: Pool, signals: Signals, config: &ResolverConfig) -> Self {
        let concurrency = pool.status().max_size.max(1);
        instruments::register();
        Resolver {
            pool,
            signals,
            settle_grace: config.settle_grace,
            // Configured in milliseconds up to an hour: always in range.
            grace: chrono::Duration::from_std(config.settle_grace).unwrap_or(chrono::Duration::MAX),
            poll: config.poll,
            interval: config.interval,
            concurrency,
            retrying: Arc::default(),
            batch: Arc::default(),
        }
    }

    /// Bids the next resolution batch takes.
    pub fn batch_size(&self) -> i64 {
        self.batch.get()
    }
}
