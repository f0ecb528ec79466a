//! Reads of bids back, with their status (the `bids` view): one bid by id
//! (a bid's own view, a replay, a wait for its outcome) and a page of an
//! auction's public history.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::{BidRecord, COLUMNS};

/// One bid by id.
pub async fn get(
    client: &impl GenericClient,
    bid_id: Uuid,
) -> Result<Option<BidRecord>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(&format!("SELECT {COLUMNS} FROM bids WHERE id = $1"))
        .await?;
    client
        .query_opt(&stmt, &[&bid_id])
        .await?
        .map(|row| BidRecord::from_row(&row))
        .transpose()
}

/// A page of an auction's bid history, newest first, strictly before `before_seq`.
pub async fn history(
    client: &impl GenericClient,
    auction_id: Uuid,
    before_seq: Option<i64>,
    limit: i64,
) -> Result<Vec<BidRecord>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM bids WHERE auction_id = $1 AND seq < $2 \
             ORDER BY seq DESC LIMIT $3"
        ))
        .await?;
    let rows = client
        .query(
            &stmt,
            &[&auction_id, &before_seq.unwrap_or(i64::MAX), &limit],
        )
        .await?;
    rows.iter().map(BidRecord::from_row).collect()
}
