-- Outcomes are recorded once per resolver batch; a bid's row is written
-- once, by its append.
--
-- Before: the resolver updated every bid's row with its outcome (a HOT
-- update: a whole new tuple in the WAL, replayed again by the replica),
-- marked a displaced leader `outbid` with another update, and settlement
-- updated every live bid of the auction to `won` or `lost`.
--
-- After: each resolver batch writes one `bid_outcomes` row: the sequence
-- numbers of the bids it applied, in resolution order, with each one's
-- rejection reason (null when accepted) and the price after it. The
-- `bids` view derives each bid's status: `pending` until a batch holds
-- it, `rejected` by its reason, and for an accepted bid `won` (the
-- auction's winning bid), `lost` (any other once the auction is closed),
-- `leading` (the auction's leader) or `outbid`. Those follow from the
-- auction row, which the batch's compare-and-set writes in the same
-- transaction, so a reader sees both or neither. Every reader of a bid's
-- status reads the view.
--
-- Finding a bid's batch: a batch's bids lie mostly in one run of sequence
-- numbers, so each row keeps the lowest and highest, indexed per auction;
-- a look-up walks the batches whose range covers the bid (one, bar a bid
-- whose transaction committed late or that waited out a soft close) and
-- takes the one that lists it.
--
-- Pending bids: the resolver still finds them by its progress over
-- (xid, seq) and the transactions left open below it (see
-- 20261209000001_pending_by_transaction). Bids it applied that the
-- progress has not passed (applied after one held back before them, or
-- written by a transaction still listed open) were skipped by their
-- status; they are now listed on the auction row (`ahead_xids`,
-- `ahead_seqs`, pairwise) until the progress passes them or their
-- transaction leaves the open list.
--
-- Rows written with their outcome (the load tests' row-lock baselines, and
-- bids resolved before this migration) keep it in their columns: the view
-- takes their rejection, reason, price and resolution from there, and
-- derives leading, outbid, won and lost from the auction the same way.
-- Their stored `leading`/`outbid`/`won`/`lost` always agreed with the
-- auction's leader, winner and status, so they carry over as they are;
-- their transaction ids go (only pending bids need one), so that such
-- rows are those without one, which settlement finds by the
-- (auction_id, xid, seq) index. Pending bids stay pending and are found
-- as before.
--
-- Sharding: bid_outcomes is keyed by auction_id, like bid_log.

CREATE TABLE bid_outcomes (
    auction_id  uuid        NOT NULL,
    -- The auction version the batch's transaction wrote.
    version     bigint      NOT NULL,
    -- The lowest and highest of seqs.
    first_seq   bigint      NOT NULL,
    last_seq    bigint      NOT NULL,
    -- The resolution number (bid_log.resolution_no) of seqs[1]; the
    -- others follow one by one.
    first_no    bigint      NOT NULL,
    resolved_at timestamptz NOT NULL DEFAULT now(),
    -- The bids applied (bid_log.seq), in resolution order.
    seqs        bigint[]    NOT NULL,
    -- Per bid: why it was rejected, null when accepted.
    reasons     text[]      NOT NULL,
    -- Per bid: the auction price right after it.
    prices      bigint[]    NOT NULL,
    PRIMARY KEY (auction_id, version),
    CHECK (cardinality(seqs) > 0
           AND cardinality(seqs) = cardinality(reasons)
           AND cardinality(seqs) = cardinality(prices)
           AND first_seq <= last_seq)
);

CREATE INDEX bid_outcomes_by_seq ON bid_outcomes (auction_id, last_seq, first_seq);

UPDATE bid_log SET xid = NULL WHERE status <> 'pending' AND xid IS NOT NULL;

ALTER TABLE auctions
    ADD COLUMN ahead_xids bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN ahead_seqs bigint[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT auctions_ahead_pairs
        CHECK (cardinality(ahead_xids) = cardinality(ahead_seqs));

-- Every bid with its status as the API states it (see above).
CREATE VIEW bids AS
SELECT b.auction_id, b.id, b.seq, b.bidder_id, b.amount, b.idempotency_key,
       b.received_at, b.xid,
       CASE
           WHEN b.status = 'pending' AND o.no IS NULL THEN 'pending'
           WHEN b.status = 'rejected' OR o.reason IS NOT NULL THEN 'rejected'
           WHEN a.winner_bid_id = b.id THEN 'won'
           WHEN a.status = 'closed' THEN 'lost'
           WHEN a.leader_bid_id = b.id THEN 'leading'
           ELSE 'outbid'
       END AS status,
       coalesce(b.reason, o.reason) AS reason,
       coalesce(b.price_after, o.price) AS price_after,
       coalesce(b.resolved_at, o.resolved_at) AS resolved_at,
       coalesce(b.resolution_no, o.no) AS resolution_no,
       coalesce(b.resolved_version, o.version) AS resolved_version
FROM bid_log b
LEFT JOIN auctions a ON a.id = b.auction_id
LEFT JOIN LATERAL (
    SELECT o.version, o.resolved_at, o.first_no + i - 1 AS no,
           o.reasons[i] AS reason, o.prices[i] AS price
    FROM bid_outcomes o
    CROSS JOIN LATERAL array_position(o.seqs, b.seq) AS i
    WHERE b.status = 'pending' AND o.auction_id = b.auction_id
      AND o.last_seq >= b.seq AND o.first_seq <= b.seq AND i IS NOT NULL
    ORDER BY o.last_seq
    LIMIT 1
) o ON true;

-- The key look-ups return bids with their status.
DROP FUNCTION gavel_find_keys(uuid[], text[], text[]);
CREATE FUNCTION gavel_find_keys(p_auction_ids uuid[], p_bidder_ids text[], p_keys text[])
RETURNS SETOF bids
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
    SELECT b.*
    FROM unnest(p_auction_ids, p_bidder_ids, p_keys) AS w(auction_id, bidder_id, key)
    CROSS JOIN LATERAL (
        SELECT * FROM bids l
        WHERE l.auction_id = w.auction_id AND l.bidder_id = w.bidder_id
          AND l.idempotency_key = w.key
        OFFSET 0) b;
END
$$;

CREATE OR REPLACE FUNCTION gavel_replay(p_auction_id uuid, p_bidder_id text, p_key text)
RETURNS TABLE (
    result text, key_auction_id uuid, key_amount bigint, key_bid_id uuid, version bigint,
    auction_id uuid, id uuid, seq bigint, bidder_id text, amount bigint, status text,
    reason text, price_after bigint, received_at timestamptz, resolved_at timestamptz,
    resolution_no bigint)
LANGUAGE sql STABLE AS $$
    SELECT 'replay', b.auction_id, b.amount, b.id, NULL::bigint,
           b.auction_id, b.id, b.seq, b.bidder_id, b.amount, b.status,
           b.reason, b.price_after, b.received_at, b.resolved_at, b.resolution_no
    FROM bids b
    WHERE b.auction_id = p_auction_id AND b.bidder_id = p_bidder_id
      AND b.idempotency_key = p_key
$$;
