-- The bids named by idempotency keys, looked up together (the bids the
-- pre-check refuses, and keys an append found taken): one probe of the
-- key's unique index per key, on a plan made once per session.
--
-- As a statement over the keys' arrays, PostgreSQL planned it at every
-- call: a plan for the arrays' actual lengths always looks cheaper than a
-- generic one, and planning the join cost several times its execution.
-- The function's settings keep its one plan generic, and a probe per key
-- whatever the statistics said when it was made (a young table would
-- otherwise get a hash join over the whole log).
CREATE FUNCTION gavel_find_keys(p_auction_ids uuid[], p_bidder_ids text[], p_keys text[])
RETURNS SETOF bid_log
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
        SELECT * FROM bid_log l
        WHERE l.auction_id = w.auction_id AND l.bidder_id = w.bidder_id
          AND l.idempotency_key = w.key
        OFFSET 0) b;
END
$$;
