//! `gavel-loadtest`: replays auction endings against Gavel's HTTP API and
//! proves, in one run on one machine, how Gavel's append-only bid path
//! compares with the classic row-lock design.
//!
//! - [`scenario`], [`trace`]: what is offered (TOML scenarios, CSV traces).
//! - [`generator`]: the open-model load generator, over [`client`] (and
//!   [`event_stream`] for its watchers), retrying as [`retry`] says; [`record`]: what it measured.
//! - [`audit`]: the database check after every run; [`freshness`]: how soon
//!   watchers and readers saw each committed change ([`receipts`]: when they did).
//! - [`report`]: JSON, Markdown and SVG reports; [`scrape`]: Gavel's metrics.
//! - [`disk`], [`cpu`]: probes of the disk's flushes and of CPU use beside a run.
//! - [`priority`]: the load's runtime, at a lower scheduling priority than the service.
//! - [`bench`](mod@bench): the one-command comparison on a private PostgreSQL,
//!   starting the server measured as [`launch`] says; [`floor`]: the HTTP
//!   floor it can run in Gavel's place; [`drain`]: one resolver against a
//!   backlog on one auction.

pub mod audit;
pub mod bench;
pub mod client;
pub mod cpu;
pub mod disk;
pub mod drain;
pub mod event_stream;
pub mod floor;
pub mod freshness;
pub mod generator;
pub mod launch;
pub mod priority;
mod probe;
pub mod receipts;
pub mod record;
pub mod report;
pub mod retry;
pub mod scenario;
pub mod scrape;
pub mod trace;
