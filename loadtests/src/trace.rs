//! Recorded bid traces: CSV rows of `offset_ms,auction,bidder,amount`,
//! replayed at a chosen speed. `auction` and `bidder` are labels: each
//! distinct auction label becomes one auction of the run (with the terms
//! of the scenario's auction group of that label, else its first group),
//! and each bidder label is a user id. A run can write the bids it sent
//! in the same format (`--record-trace`), so a synthetic ending can be
//! replayed later, faster or slower.

use std::io::Write as _;
use std::path::Path;

use anyhow::{ensure, Context as _};
use serde::{Deserialize, Serialize};

/// One recorded bid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceBid {
    /// Milliseconds after the trace started.
    pub offset_ms: u64,
    /// Auction label.
    pub auction: String,
    /// Bidder (user id).
    pub bidder: String,
    /// The bidder's maximum, in minor units.
    pub amount: i64,
}

/// Reads a trace, checking every row; rows come back in offset order.
pub fn load(path: &Path) -> anyhow::Result<Vec<TraceBid>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_path(path)
        .with_context(|| format!("opening the trace {}", path.display()))?;
    let headers = reader.headers()?.clone();
    ensure!(
        headers.iter().collect::<Vec<_>>() == ["offset_ms", "auction", "bidder", "amount"],
        "{}: the header must be offset_ms,auction,bidder,amount",
        path.display()
    );
    let mut bids = Vec::new();
    for (i, row) in reader.deserialize::<TraceBid>().enumerate() {
        let line = i + 2;
        let bid = row.with_context(|| format!("{}:{line}", path.display()))?;
        gavel::domain::UserId::parse(&bid.bidder)
            .map_err(|e| anyhow::anyhow!("{}:{line}: bidder: {e}", path.display()))?;
        ensure!(
            !bid.auction.is_empty()
                && bid.auction.len() <= 64
                && bid
                    .auction
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{}:{line}: auction: use 1 to 64 letters, digits and '-'",
            path.display()
        );
        gavel::domain::Amount::parse(bid.amount)
            .map_err(|e| anyhow::anyhow!("{}:{line}: amount {e}", path.display()))?;
        bids.push(bid);
    }
    ensure!(
        !bids.is_empty(),
        "{}: the trace has no bids",
        path.display()
    );
    bids.sort_by_key(|b| b.offset_ms);
    Ok(bids)
}

/// Writes `bids` as a trace.
pub fn write(path: &Path, bids: &[TraceBid]) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("creating the trace {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    writeln!(out, "offset_ms,auction,bidder,amount")?;
    for b in bids {
        writeln!(
            out,
            "{},{},{},{}",
            b.offset_ms, b.auction, b.bidder, b.amount
        )?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_trace_reads_back_in_offset_order() {
        let dir = std::env::temp_dir().join(format!("gavel-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.csv");
        let bids = vec![
            TraceBid {
                offset_ms: 20,
                auction: "hot".into(),
                bidder: "b-2".into(),
                amount: 1_100,
            },
            TraceBid {
                offset_ms: 5,
                auction: "hot".into(),
                bidder: "b-1".into(),
                amount: 1_000,
            },
        ];
        write(&path, &bids).unwrap();
        let read = load(&path).unwrap();
        assert_eq!(read, vec![bids[1].clone(), bids[0].clone()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_row_is_named_by_line() {
        let dir = std::env::temp_dir().join(format!("gavel-trace-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.csv");
        std::fs::write(
            &path,
            "offset_ms,auction,bidder,amount\n0,hot,b-1,100\n10,hot,b-2,-5\n",
        )
        .unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("t.csv:3: amount"), "{e}");
        std::fs::write(&path, "offset,auction,bidder,amount\n0,hot,b-1,100\n").unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("header"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
