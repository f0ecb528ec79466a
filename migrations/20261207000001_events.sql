-- The event log: what changed, written in the transaction that changed it,
-- for the bidders' streams (GET /api/me/events) and, later, the
-- marketplace's feed and webhooks.
--
-- One row per auction per transaction that changes bids: kind 'bids' (the
-- outcomes of a resolver batch, a displaced leader marked outbid, a bid of
-- the row-lock baseline) and 'auction.settled' (the winning bid won, every
-- other live bid lost), with one array entry per bid changed. A row per
-- batch, not per bid, keeps the resolver's writes per bid small.
--
-- Order and paging: rows are ordered by (xid, auction_id, n) and read only
-- below the oldest transaction still running (pg_snapshot_xmin): every row
-- there has committed or never will, so a reader that has served up to a
-- transaction id never later finds an earlier row committed behind it. One
-- auction's transactions never overlap (the resolver's lock and version),
-- so for each bid this order is the order its changes committed.
--
-- Sharding: keyed by auction_id with the transaction id, like bid_log.

CREATE TABLE events (
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    auction_id uuid        NOT NULL,
    -- Order within one transaction's rows for one auction.
    n          smallint    NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('bids', 'auction.settled')),
    at         timestamptz NOT NULL DEFAULT now(),
    bid_ids    uuid[]      NOT NULL,
    bidders    text[]      NOT NULL,
    statuses   text[]      NOT NULL,
    -- The payload of an event for the marketplace ('auction.settled').
    data       jsonb,
    PRIMARY KEY (xid, auction_id, n),
    CHECK (cardinality(bid_ids) = cardinality(bidders)
           AND cardinality(bid_ids) = cardinality(statuses))
);

-- No index on bidders: a stream that resumes reads the rows after its
-- cursor by the primary key and keeps its bidder's entries. A GIN index
-- would add an entry per bid, and its pending list, flushed by whichever
-- transaction fills it, stalls the resolver in the final minute.
