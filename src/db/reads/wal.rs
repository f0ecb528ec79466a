//! WAL positions: the primary's insert and flush positions, a replica's
//! replay position, and the page geometry needed to compare them. Positions
//! are how a client's consistency token and a replica's lag are expressed.

use std::future::Future;

use deadpool_postgres::{GenericClient, Object};
use tokio_postgres::types::PgLsn;

/// The primary's current WAL insert position: after this session's writes.
pub async fn wal_position(client: &impl GenericClient) -> Result<PgLsn, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT pg_current_wal_insert_lsn()")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// Runs `statement`, an autocommitted query of a statement already
/// prepared on `client`, and reads the WAL insert position right after its
/// commit: both are sent at once, one round trip. The query goes on the
/// wire when first polled, and `futures::join!` polls it before the
/// position's, so the position is read after the statement has committed
/// (or failed). The position is `None` when it could not be read.
pub async fn with_wal_position<T>(
    client: &impl GenericClient,
    statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> (Result<T, tokio_postgres::Error>, Option<PgLsn>) {
    let (result, position) = futures::join!(statement, wal_position(client));
    (result, position.ok())
}

/// How far the primary's WAL is durably flushed. Every write whose commit
/// has returned is at or below it (with `synchronous_commit` on); unlike
/// the insert position it does not run ahead of what a replica can receive,
/// since WAL inserted but not flushed (such as a table lock logged for
/// standbys on an idle primary) is not sent to replicas until a flush.
pub(super) async fn flushed_wal_position(
    client: &impl GenericClient,
) -> Result<PgLsn, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT pg_current_wal_flush_lsn()")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// The primary's WAL page and segment sizes, needed to compare positions.
#[derive(Debug, Clone, Copy)]
pub(super) struct WalGeometry {
    page: u64,
    segment: u64,
}

/// Header at the start of every WAL page, and of every segment's first page.
const WAL_PAGE_HEADER: u64 = 24;
const WAL_SEGMENT_HEADER: u64 = 40;

impl WalGeometry {
    /// Reads the sizes from the server's settings.
    pub(super) async fn read(client: &impl GenericClient) -> Result<Self, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT current_setting('wal_block_size')::bigint, \
                        pg_size_bytes(current_setting('wal_segment_size'))",
                &[],
            )
            .await?;
        let (page, segment): (i64, i64) = (row.get(0), row.get(1));
        Ok(WalGeometry {
            page: page as u64,
            segment: segment as u64,
        })
    }

    /// A WAL position moved back over a page header: an insert position at
    /// the start of a page points just past the header, while a replica
    /// that replayed everything before it reports the page boundary. No WAL
    /// record ends inside a header, so both mean the same data.
    pub(super) fn normalize(self, lsn: u64) -> u64 {
        let header = if lsn % self.segment == WAL_SEGMENT_HEADER {
            WAL_SEGMENT_HEADER
        } else if lsn % self.page == WAL_PAGE_HEADER {
            WAL_PAGE_HEADER
        } else {
            0
        };
        lsn - header
    }
}

/// A replica's replay position: what queries on it see.
pub(super) async fn replay_position(
    client: &Object,
) -> Result<Option<PgLsn>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT pg_last_wal_replay_lsn()")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_just_past_a_page_header_means_the_page_boundary() {
        for (page, segment) in [(8_192, 16 << 20), (32_768, 64 << 20)] {
            let geometry = WalGeometry { page, segment };
            let position = |lsn| geometry.normalize(lsn);
            assert_eq!(position(3 * page + 24), 3 * page);
            assert_eq!(position(2 * segment + 40), 2 * segment);
            // Inside a page, or 40 bytes into a page that does not start a segment.
            assert_eq!(position(3 * page + 40), 3 * page + 40);
            assert_eq!(position(3 * page + 25), 3 * page + 25);
            assert_eq!(position(12_345_678), 12_345_678);
        }
        // 40 bytes past a 16 MiB boundary that does not start a 64 MiB segment.
        let large = WalGeometry {
            page: 8_192,
            segment: 64 << 20,
        };
        assert_eq!(large.normalize((16 << 20) + 40), (16 << 20) + 40);
    }
}
