-- Pending bids are found by the transaction that wrote them, not by a
-- queue row per bid.
--
-- Before: a statement trigger copied every pending bid into
-- `pending_bids`, and the resolver deleted the copy in the transaction
-- that wrote the bid's outcome: per bid, a second heap row, its index
-- entry, a delete, and vacuums of the queue.
--
-- After: every pending bid row carries the id of the transaction that
-- inserted it (`xid`, `pg_current_xact_id()`), indexed with its sequence number per
-- auction. Each auction keeps the resolver's progress over that order
-- (`resolved_xid`, `resolved_seq`) and the transactions that were still in
-- progress below it when it was written (`open_xids`). A bid is still to
-- resolve when it lies after the progress, or was written by one of those
-- transactions. The resolver reads a bid only once it is visible, moves
-- the progress over the bids it resolved, and keeps in `open_xids` every
-- transaction its snapshot saw in progress below the new position: such a
-- transaction may still commit bids there. A transaction id is assigned
-- when the transaction first writes, so one that had none when the
-- snapshot was taken gets a larger id than any the snapshot saw: its bids
-- land after the progress. This is a commit-safe position, never a
-- sequence watermark (a bid with a lower seq can commit later). `src/db/bids/resolve.rs` has the
-- argument in full.
--
-- Sharding: the new index starts with auction_id, like every index on
-- bid_log; the progress lives on the auction's own row.

-- Set by the log path's append, in the statement that inserts the bid;
-- NULL on bids written already resolved (the load tests' baselines) and
-- on bids resolved before this migration, which no position follows. A
-- pending bid without it would never be found: refused.
ALTER TABLE bid_log ADD COLUMN xid bigint;

ALTER TABLE auctions
    ADD COLUMN resolved_xid bigint NOT NULL DEFAULT 0,
    ADD COLUMN resolved_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN open_xids bigint[] NOT NULL DEFAULT '{}';

-- Bids still pending when this runs: after every auction's initial
-- progress (0, 0), so the resolver finds them as it finds new ones.
UPDATE bid_log SET xid = 1 WHERE status = 'pending';
ALTER TABLE bid_log ADD CONSTRAINT bid_log_pending_has_xid
    CHECK (status <> 'pending' OR xid IS NOT NULL);

CREATE INDEX bid_log_by_transaction ON bid_log (auction_id, xid, seq);

DROP TRIGGER bid_log_queue_pending ON bid_log;
DROP FUNCTION queue_pending_bids();
DROP TABLE pending_bids;
