//! Integration tests: the real server against a real, private PostgreSQL.

mod bad_input;
mod baselines;
mod bidding;
mod cdp;
mod cli;
mod closing;
mod coalescing;
mod edge;
mod helpers;
mod live;
mod marketplace;
mod migrations;
mod observability;
mod overload;
mod processes;
mod reads;
mod replicas;
mod row_lock;
mod rules_port;
mod watch;
mod webhooks;
