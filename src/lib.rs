//! Gavel: an auction bidding backend whose bid path only appends to a log,
//! while one resolver per auction computes prices with optimistic versioning.
//!
//! - [`bidding`]: where a bid is accepted (checks, durable append).
//! - [`rules`]: where the price is computed (pure auction rules).
//! - [`resolver`]: the background writer of auction state.
//! - [`http`]: the API; [`live`]: the live views behind its event streams;
//!   [`db`]: pools, migrations and queries.
//! - [`signals`]: the in-process bus (and its LISTEN/NOTIFY bridge) that
//!   wakes the resolver and waiting requests; [`error`]: the one
//!   application error type; [`config`]: settings, validated at start-up.
//! - [`marketplace`]: events for the marketplace and their admin feed;
//!   [`webhooks`]: their signed delivery.
//! - [`telemetry`]: logs, the Prometheus recorder and the `pg_stat_activity`
//!   sampler.
//! - [`server`], [`cli`] and `dev` (the `dev` feature, on by default: a
//!   local run on private PostgreSQL clusters from the `pg_cluster` crate):
//!   running it.

pub mod alarm;
pub mod auth;
pub mod bidding;
pub mod cli;
pub mod config;
pub mod db;
#[cfg(feature = "dev")]
pub mod dev;
pub mod domain;
pub mod error;
pub mod http;
pub mod live;
pub mod marketplace;
pub mod rate_limit;
pub mod resolver;
pub mod rules;
pub mod server;
pub mod signals;
pub mod telemetry;
pub mod webhooks;
