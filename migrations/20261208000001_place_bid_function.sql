-- The tuned row-lock baseline (GAVEL_BID_PATH=row_lock_fn): the classic
-- row-lock bid transaction of `row_lock`, sent as one statement, so a bid
-- costs one round trip from Gavel, commit included, and nothing waits on
-- the network while the auction is locked.
--
-- `gavel_apply_bid` is a port of `apply_bid` in src/rules.rs (rules 1-10,
-- numbered as there): pure, no table access. A property test drives random
-- bid sequences through it and through the Rust rules and compares them;
-- change both or neither.
--
-- `gavel_place_bid` is the locked transaction: the same lock order, writes,
-- outcomes and event rows as src/bidding/row_lock.rs. It sends no NOTIFY: a
-- NOTIFY is queued at commit under a lock every notifying transaction in
-- the database takes in turn, which would serialize the commits and hold
-- the auction's lock meanwhile. Gavel announces the change after the
-- commit instead, coalesced per auction.

-- Money arithmetic saturates, as in the Rust rules (amounts, steps and
-- counts are never negative).
CREATE FUNCTION gavel_saturating_add(a bigint, b bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT least(a::numeric + b, 9223372036854775807)::bigint
$$;

-- `Increments::step_at`: the step of the tier with the greatest
-- `from <= price`, the first tier's below it. Tiers ascend by `from`.
CREATE FUNCTION gavel_step_at(increments jsonb, price bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    tier jsonb;
    step bigint := (increments -> 0 ->> 'step')::bigint;
BEGIN
    FOR tier IN SELECT jsonb_array_elements(increments) LOOP
        EXIT WHEN (tier ->> 'from')::bigint > price;
        step := (tier ->> 'step')::bigint;
    END LOOP;
    RETURN step;
END
$$;

-- One bid applied to an auction's state: the terms, the state before, the
-- bid; returns the bid's status ('leading', 'outbid', 'rejected'), the
-- rejection reason, the leading bid it displaced, and the state after.
CREATE FUNCTION gavel_apply_bid(
    seller_id text, starting_price bigint, reserve_price bigint, increments jsonb,
    starts_at timestamptz, soft_close_s integer, max_end_at timestamptz,
    leader_bid_id uuid, leader_bidder_id text, leader_max bigint, price bigint,
    bid_count bigint, ends_at timestamptz, closed boolean,
    bid_id uuid, bidder_id text, amount bigint, received_at timestamptz,
    OUT status text, OUT reason text, OUT displaced uuid,
    OUT new_leader_bid_id uuid, OUT new_leader_bidder_id text, OUT new_leader_max bigint,
    OUT new_price bigint, OUT new_bid_count bigint, OUT new_ends_at timestamptz)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    at_price bigint := coalesce(price, starting_price);
    window_s interval := make_interval(secs => soft_close_s);
BEGIN
    new_leader_bid_id := leader_bid_id;
    new_leader_bidder_id := leader_bidder_id;
    new_leader_max := leader_max;
    new_price := price;
    new_bid_count := bid_count;
    new_ends_at := ends_at;
    status := 'rejected';
    -- Rule 1.
    IF closed THEN
        reason := 'auction_closed';
    ELSIF received_at < starts_at THEN
        reason := 'auction_not_started';
    ELSIF received_at > ends_at THEN
        reason := 'auction_closed';
    -- Rule 2.
    ELSIF bidder_id = seller_id THEN
        reason := 'seller_cannot_bid';
    -- Rule 3 (a non-positive amount is never a real offer).
    ELSIF leader_bid_id IS NULL OR leader_bidder_id IS NULL OR leader_max IS NULL THEN
        IF amount < starting_price OR amount <= 0 THEN
            reason := 'below_minimum';
        ELSE
            status := 'leading';
            new_price := starting_price;
        END IF;
    -- Rule 4.
    ELSIF bidder_id = leader_bidder_id THEN
        IF amount <= leader_max THEN
            reason := 'not_above_own_max';
        ELSE
            status := 'leading';
            new_price := at_price;
        END IF;
    -- Rule 5.
    ELSIF amount < gavel_saturating_add(at_price, gavel_step_at(increments, at_price)) THEN
        reason := 'below_minimum';
    -- Rule 6.
    ELSIF amount > leader_max THEN
        status := 'leading';
        new_price := least(amount,
            gavel_saturating_add(leader_max, gavel_step_at(increments, leader_max)));
    -- Rule 7: on a tie the earlier bid wins.
    ELSIF amount = leader_max THEN
        status := 'outbid';
        new_price := amount;
    -- Rule 8.
    ELSE
        status := 'outbid';
        new_price := least(leader_max,
            gavel_saturating_add(amount, gavel_step_at(increments, amount)));
    END IF;
    IF status = 'rejected' THEN
        RETURN;
    END IF;
    IF status = 'leading' THEN
        displaced := leader_bid_id;
        new_leader_bid_id := bid_id;
        new_leader_bidder_id := bidder_id;
        new_leader_max := amount;
    END IF;
    -- Rule 9.
    IF reserve_price IS NOT NULL AND new_leader_max >= reserve_price THEN
        new_price := greatest(new_price, reserve_price);
    END IF;
    -- Rule 10.
    IF soft_close_s > 0 AND received_at > ends_at - window_s THEN
        new_ends_at := greatest(ends_at, least(received_at + window_s, max_end_at));
    END IF;
    new_bid_count := gavel_saturating_add(bid_count, 1);
END
$$;

-- The earlier request of `bidder_id` with `key`, if any: what it asked for
-- and its bid as stored, in `gavel_place_bid`'s shape ('replay').
CREATE FUNCTION gavel_replay(p_bidder_id text, p_key text)
RETURNS TABLE (
    result text, key_auction_id uuid, key_amount bigint, key_bid_id uuid, version bigint,
    auction_id uuid, id uuid, seq bigint, bidder_id text, amount bigint, status text,
    reason text, price_after bigint, received_at timestamptz, resolved_at timestamptz,
    resolution_no bigint)
LANGUAGE sql STABLE AS $$
    SELECT 'replay', k.auction_id, k.amount, k.bid_id, NULL::bigint,
           b.auction_id, b.id, b.seq, b.bidder_id, b.amount, b.status,
           b.reason, b.price_after, b.received_at, b.resolved_at, b.resolution_no
    FROM idempotency_keys k
    LEFT JOIN bid_log b ON b.auction_id = k.auction_id AND b.id = k.bid_id
    WHERE k.bidder_id = p_bidder_id AND k.key = p_key
$$;

-- Places one bid in one transaction (called as a statement of its own, so
-- the statement is the transaction). Returns one row: 'placed' with the
-- bid as stored and the auction's new version; 'replay' when the bidder
-- already used the key (nothing written; see gavel_replay); 'no_auction'.
--
-- Under the auction's lock, and nothing else: read the row, claim the key,
-- apply the rules, write the row, the bid, the displaced leader and the
-- event row. A retry of a finished request is answered before the lock.
CREATE FUNCTION gavel_place_bid(
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
    RETURN QUERY SELECT * FROM gavel_replay(p_bidder_id, p_key);
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
    -- A concurrent request with the key on another auction holds its
    -- unique entry until it ends; then the key is either ours or theirs.
    LOOP
        INSERT INTO idempotency_keys (bidder_id, key, auction_id, amount, bid_id)
        VALUES (p_bidder_id, p_key, p_auction_id, p_amount, p_bid_id)
        ON CONFLICT (bidder_id, key) DO NOTHING;
        EXIT WHEN FOUND;
        RETURN QUERY SELECT * FROM gavel_replay(p_bidder_id, p_key);
        IF FOUND THEN
            RETURN;
        END IF;
    END LOOP;
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
