//! What the event streams show, kept live in each process: auction views
//! ([`auctions`]: one feed per watched auction, each change read once) and
//! bidders' bid changes ([`bidders`]: one reader of the event log, each new
//! row read once). Streams hold no database connection while idle.

pub mod auctions;
pub mod bidders;
mod pace;

pub use auctions::{LiveViews, Snapshot, Watch, CLASSES};
pub use bidders::{BidEvent, BidderFeeds, Cursor};
