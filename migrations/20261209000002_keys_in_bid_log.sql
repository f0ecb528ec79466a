-- Idempotency keys are kept in the bid log: a bid writes one row.
--
-- Before: every bid wrote its `bid_log` row (which already held the key
-- and the amount asked for) and an `idempotency_keys` row keyed by
-- (bidder_id, key), with its primary key and BRIN index; the resolver
-- purged keys after GAVEL_IDEMPOTENCY_RETENTION_H (48 h).
--
-- After: a key belongs to an auction, a bidder and the key itself, as the
-- contract scopes it, and a unique index on bid_log holds it. The bid row
-- is the key's record and its amount the request's fingerprint. A key
-- lives as long as its bid (bids are never deleted), so beyond the
-- contract's 24 h. The same key on another auction is another request.
--
-- Existing data. Every writer inserted a key and its bid in one
-- transaction (the log path's append in one statement, each baseline in
-- its bid's transaction) with the same bidder, key, auction and amount,
-- and nothing deletes bids: no key lacks its bid, and dropping the table
-- loses nothing. Keys purged from the table come back with their bids.
-- The old scope held a key only until its purge: a bidder could then use
-- it again, on the same auction too. Of such repeats the bid the key still
-- named (else the newest) keeps the key; the older ones' keys are retired
-- with a suffix no request can carry (a key has no spaces), so the unique
-- index builds. A retired key was already forgotten before this ran.
--
-- Measured on a scratch PostgreSQL 15 (fsync on), each schema taking
-- 200,000 bids in batches of 500, random bidders, UUID keys, the append's
-- statement as before and after: WAL 980 -> 864 bytes a bid (then
-- 1,125 -> 1,024 and 1,260 -> 1,181 over the next 200,000 each, as pages
-- of the random-key indexes fill); storage 801 -> 700 bytes a bid (the
-- key table's 229 gone, bid_log and its indexes 572 -> 700). Time was not
-- compared: the machine was shared; the load tests measure that.
--
-- Sharding: every unique index on bid_log starts with auction_id.
--
-- The row-lock function baseline (see 20261208000001_place_bid_function)
-- looks its key up in bid_log: before the auction's lock to answer a
-- finished request, and again under it. Both row-lock baselines write an
-- auction's bids only under that lock, so under it a key found absent
-- stays absent until the bid is written; a writer that does not take the
-- lock (another process on the log path or the optimistic baseline) is
-- stopped by the unique index, and Gavel answers that violation as a
-- replay. The functions keep their outcomes; only the key's look-up and
-- claim change.

UPDATE bid_log b
   SET idempotency_key = b.idempotency_key || ' retired ' || b.seq
  FROM (SELECT used.auction_id, used.id,
               row_number() OVER (
                   PARTITION BY used.auction_id, used.bidder_id, used.idempotency_key
                   ORDER BY (k.bid_id IS NOT NULL) DESC, used.seq DESC) AS rank
          FROM bid_log used
          LEFT JOIN idempotency_keys k ON k.bid_id = used.id
         WHERE (used.auction_id, used.bidder_id, used.idempotency_key) IN (
                   SELECT auction_id, bidder_id, idempotency_key FROM bid_log
                    GROUP BY auction_id, bidder_id, idempotency_key HAVING count(*) > 1)
       ) repeated
 WHERE repeated.rank > 1 AND b.auction_id = repeated.auction_id AND b.id = repeated.id;

CREATE UNIQUE INDEX bid_log_idempotency_key
    ON bid_log (auction_id, bidder_id, idempotency_key);

DROP TABLE idempotency_keys;

-- The earlier request of `bidder_id` with `key` on the auction, if any: its
-- bid as stored, in `gavel_place_bid`'s shape ('replay'; the key_* columns
-- are the bid's auction, amount and id).
DROP FUNCTION gavel_replay(text, text);
CREATE FUNCTION gavel_replay(p_auction_id uuid, p_bidder_id text, p_key text)
RETURNS TABLE (
    result text, key_auction_id uuid, key_amount bigint, key_bid_id uuid, version bigint,
    auction_id uuid, id uuid, seq bigint, bidder_id text, amount bigint, status text,
    reason text, price_after bigint, received_at timestamptz, resolved_at timestamptz,
    resolution_no bigint)
LANGUAGE sql STABLE AS $$
    SELECT 'replay', b.auction_id, b.amount, b.id, NULL::bigint,
           b.auction_id, b.id, b.seq, b.bidder_id, b.amount, b.status,
           b.reason, b.price_after, b.received_at, b.resolved_at, b.resolution_no
    FROM bid_log b
    WHERE b.auction_id = p_auction_id AND b.bidder_id = p_bidder_id
      AND b.idempotency_key = p_key
$$;

-- Places one bid in one transaction (called as a statement of its own, so
-- the statement is the transaction). Returns one row: 'placed' with the
-- bid as stored and the auction's new version; 'replay' when the bidder
-- already used the key on the auction (nothing written; see
-- gavel_replay); 'no_auction'.
--
-- Under the auction's lock, and nothing else: read the row, look the key
-- up, apply the rules, write the row, the bid, the displaced leader and
-- the event row. A retry of a finished request is answered before the lock.
CREATE OR REPLACE FUNCTION gavel_place_bid(
    p_auction_id uuid, p_bid_id uuid, p_bidder_id text, p_key text, p_amount bigint)
RETURNS TABLE (
    result text, key_auction_id uuid, key_amount bigint, key_bid_id uuid, version bigint,
    auction_id uuid, id uuid, seq bigint, bidder_id text, amount bigint, status text,
    reason text, price_after bigint, received_at timestamptz, resolved_at timestamptz,
    resolution_no bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    a auctions%ROWTYPE;
    r record;
    logged bid_log%ROWTYPE;
BEGIN
    RETURN QUERY SELECT * FROM gavel_replay(p_auction_id, p_bidder_id, p_key);
    IF FOUND THEN
        RETURN;
    END IF;
    -- The resolver's advisory lock, as row_lock takes it: waiting for it
    -- takes no transaction id, so the ids of the auction's transactions
    -- follow the order they commit in, as the event log's readers need.
    PERFORM pg_advisory_xact_lock(hashtextextended(p_auction_id::text, 0));
    SELECT * INTO a FROM auctions WHERE id = p_auction_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_auction', NULL::uuid, NULL::bigint, NULL::uuid, NULL::bigint,
            NULL::uuid, NULL::uuid, NULL::bigint, NULL::text, NULL::bigint, NULL::text,
            NULL::text, NULL::bigint, NULL::timestamptz, NULL::timestamptz, NULL::bigint;
        RETURN;
    END IF;
    -- A request with the key that held the lock before us has committed
    -- its bid: this statement's snapshot sees it.
    RETURN QUERY SELECT * FROM gavel_replay(p_auction_id, p_bidder_id, p_key);
    IF FOUND THEN
        RETURN;
    END IF;
    LOOP
        SELECT * INTO r FROM gavel_apply_bid(
            a.seller_id, a.starting_price, a.reserve_price, a.increments,
            a.starts_at, a.soft_close_s, a.max_end_at,
            a.leader_bid_id, a.leader_bidder_id, a.leader_max, a.current_price,
            a.bid_count, a.ends_at, a.status = 'closed',
            p_bid_id, p_bidder_id, p_amount, now());
        -- Written even for a rejected bid, as row_lock does.
        UPDATE auctions SET leader_bid_id = r.new_leader_bid_id,
               leader_bidder_id = r.new_leader_bidder_id, leader_max = r.new_leader_max,
               current_price = r.new_price, bid_count = r.new_bid_count,
               ends_at = r.new_ends_at, resolved_count = a.resolved_count + 1,
               version = a.version + 1
         WHERE id = p_auction_id AND version = a.version;
        EXIT WHEN FOUND;
        -- Only a writer that does not take the auction's lock (an auction's
        -- opening at its start) can have moved the row since it was read.
        SELECT * INTO a FROM auctions WHERE id = p_auction_id;
    END LOOP;
    -- The key's unique index stops a writer that does not take the lock.
    INSERT INTO bid_log (auction_id, id, bidder_id, amount, idempotency_key, status,
                         reason, price_after, resolution_no, resolved_version, resolved_at)
    VALUES (p_auction_id, p_bid_id, p_bidder_id, p_amount, p_key, r.status,
            r.reason, r.new_price, a.resolved_count + 1, a.version + 1, now())
    RETURNING * INTO logged;
    IF r.displaced IS NOT NULL THEN
        UPDATE bid_log SET status = 'outbid'
         WHERE auction_id = p_auction_id AND id = r.displaced AND status = 'leading';
        INSERT INTO events (auction_id, n, kind, bid_ids, bidders, statuses, version)
        VALUES (p_auction_id, 0, 'bids', ARRAY[r.displaced, p_bid_id],
                ARRAY[a.leader_bidder_id, p_bidder_id], ARRAY['outbid', r.status],
                a.version + 1);
    ELSE
        INSERT INTO events (auction_id, n, kind, bid_ids, bidders, statuses, version)
        VALUES (p_auction_id, 0, 'bids', ARRAY[p_bid_id], ARRAY[p_bidder_id],
                ARRAY[r.status], a.version + 1);
    END IF;
    RETURN QUERY SELECT 'placed', NULL::uuid, NULL::bigint, NULL::uuid, a.version + 1,
        logged.auction_id, logged.id, logged.seq, logged.bidder_id, logged.amount,
        logged.status, logged.reason, logged.price_after, logged.received_at,
        logged.resolved_at, logged.resolution_no;
END
$$;
