//! Cross-process wake-ups over PostgreSQL LISTEN/NOTIFY.
//!
//! Channel `gavel_bids` carries an auction id with new bids appended by a
//! process that runs no resolver of its own (`GAVEL_RESOLVER=off`);
//! `gavel_resolved` carries an auction id whose state another process just
//! committed, for requests waiting with `Prefer: wait`. Payloads name the
//! sending process so nobody reacts to its own announcements. Both are
//! hints: the resolver's polling fallback finds all pending work by state.

use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Resolved, Signals};

/// Channel for "this auction has new pending bids".
pub const BIDS_CHANNEL: &str = "gavel_bids";
/// Channel for "this auction's bids were resolved".
pub const RESOLVED_CHANNEL: &str = "gavel_resolved";

/// Listens on both channels over a dedicated connection, reconnecting after
/// failures, until `shutdown`. `wake_resolver` is false in processes that
/// do not run a resolver.
pub async fn listen(
    config: tokio_postgres::Config,
    signals: Signals,
    wake_resolver: bool,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(e) = listen_once(&config, &signals, wake_resolver, &shutdown).await {
            tracing::warn!(error = %e, "notification listener disconnected; reconnecting");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    signals: &Signals,
    wake_resolver: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The connection must be polled for queries to complete, so it runs in
    // its own task and forwards notifications.
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx
                        .send((n.channel().to_owned(), n.payload().to_owned()))
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client
        .batch_execute(&format!("LISTEN {BIDS_CHANNEL}; LISTEN {RESOLVED_CHANNEL}"))
        .await?;
    // Anything announced while we were disconnected is found by state.
    if wake_resolver {
        signals.bid_appended(Uuid::nil());
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            message = rx.recv() => {
                let Some((channel, payload)) = message else { break };
                let Some(auction_id) = signals.foreign_notification(&payload) else { continue };
                match channel.as_str() {
                    BIDS_CHANNEL if wake_resolver => signals.bid_appended(auction_id),
                    RESOLVED_CHANNEL => signals.publish(Resolved {
                        auction_id,
                        bids: None,
                        version: None,
                        view: None,
                    }),
                    _ => {}
                }
            }
        }
    }
    drop(client);
    match driver.await {
        Ok(Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

/// In a process without a resolver, forwards local "new bids" signals to
/// the resolvers of other processes, at most one NOTIFY per auction per
/// round: NOTIFY serializes committing transactions, so it must never be
/// sent per bid.
pub async fn forward_bids(pool: crate::db::Pool, signals: Signals, shutdown: CancellationToken) {
    let wait = |signals: Signals| async move { signals.woken().await };
    forward(
        pool,
        signals,
        shutdown,
        BIDS_CHANNEL,
        wait,
        Signals::take_dirty,
    )
    .await;
}

/// On the baselines that resolve bids in their requests and commit without
/// a NOTIFY, announces the auctions this process changed on
/// `gavel_resolved`, after their commits and at most once per auction per
/// round (see [`forward_bids`] for why).
pub async fn forward_resolved(
    pool: crate::db::Pool,
    signals: Signals,
    shutdown: CancellationToken,
) {
    let wait = |signals: Signals| async move { signals.changed_here_woken().await };
    let take = Signals::take_changed_here;
    forward(pool, signals, shutdown, RESOLVED_CHANNEL, wait, take).await;
}

/// Sends what `take` gathered on `channel` each time `wait` ends, until
/// `shutdown`.
async fn forward<W, F>(
    pool: crate::db::Pool,
    signals: Signals,
    shutdown: CancellationToken,
    channel: &'static str,
    wait: W,
    take: fn(&Signals) -> Vec<Uuid>,
) where
    W: Fn(Signals) -> F,
    F: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wait(signals.clone()) => {}
        }
        let auctions = take(&signals);
        if let Err(e) = notify(&pool, &signals, channel, &auctions).await {
            tracing::warn!(error = %e, channel, "could not send wake-ups; readers will poll");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends one `gavel_bids` notification per auction.
pub async fn notify_bids(
    pool: &crate::db::Pool,
    signals: &Signals,
    auctions: &[Uuid],
) -> anyhow::Result<()> {
    notify(pool, signals, BIDS_CHANNEL, auctions).await
}

/// Sends one notification on `channel` per auction.
async fn notify(
    pool: &crate::db::Pool,
    signals: &Signals,
    channel: &str,
    auctions: &[Uuid],
) -> anyhow::Result<()> {
    if auctions.is_empty() {
        return Ok(());
    }
    let client = pool.get().await?;
    let payloads: Vec<String> = auctions.iter().map(|a| signals.notification(*a)).collect();
    client
        .execute(
            "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload",
            &[&channel, &payloads],
        )
        .await?;
    Ok(())
}
