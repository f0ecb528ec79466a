-- Gavel core schema: auctions (current state, CAS on version), the append-only
-- bid log with the resolver's outcome, and idempotency keys scoped by bidder.
--
-- Sharding: every key on bid_log starts with auction_id (the distribution
-- column), idempotency_keys is keyed by bidder_id. bid_log deliberately has
-- NO foreign key to auctions: a FK check takes FOR KEY SHARE on the hot
-- auction row on every insert, which is exactly the contention Gavel removes.

CREATE TABLE auctions (
    id              uuid        PRIMARY KEY,
    seller_id       text        NOT NULL CHECK (char_length(seller_id) BETWEEN 1 AND 64),
    title           text        NOT NULL CHECK (char_length(title) BETWEEN 1 AND 200),
    currency        text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    starting_price  bigint      NOT NULL CHECK (starting_price BETWEEN 1 AND 1000000000000000),
    reserve_price   bigint      CHECK (reserve_price >= starting_price),
    increments      jsonb       NOT NULL,
    starts_at       timestamptz NOT NULL,
    original_ends_at timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    soft_close_s    integer     NOT NULL DEFAULT 0 CHECK (soft_close_s >= 0),
    max_end_at      timestamptz NOT NULL,
    status          text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    -- Resolver-owned state, written only with UPDATE ... WHERE version = $v.
    leader_bid_id   uuid,
    leader_bidder_id text,
    leader_max      bigint,
    current_price   bigint,
    bid_count       bigint      NOT NULL DEFAULT 0,
    resolved_count  bigint      NOT NULL DEFAULT 0,
    winner_id       text,
    winner_bid_id   uuid,
    settled_at      timestamptz,
    version         bigint      NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at),
    CHECK (max_end_at >= original_ends_at)
);

-- The resolver's settle scan: open auctions by end time.
CREATE INDEX auctions_open_by_end ON auctions (ends_at) WHERE status = 'open';

CREATE TABLE bid_log (
    auction_id      uuid        NOT NULL,
    id              uuid        NOT NULL,
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    bidder_id       text        NOT NULL CHECK (char_length(bidder_id) BETWEEN 1 AND 64),
    amount          bigint      NOT NULL CHECK (amount BETWEEN 1 AND 1000000000000000),
    idempotency_key text        NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    -- Outcome, written once by the resolver (pending -> leading/outbid/rejected),
    -- then moved by later bids (leading -> outbid) and by settlement (-> won/lost).
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'leading', 'outbid', 'rejected', 'won', 'lost')),
    reason          text,
    price_after     bigint,
    resolved_at     timestamptz,
    -- Position of this bid in its auction's resolution order (1, 2, ...).
    -- Unique per auction, so a bid can never be applied twice.
    resolution_no   bigint,
    resolved_version bigint,
    PRIMARY KEY (auction_id, id),
    CHECK ((status = 'pending') = (resolution_no IS NULL))
);

CREATE UNIQUE INDEX bid_log_resolution_order ON bid_log (auction_id, resolution_no)
    WHERE resolution_no IS NOT NULL;
-- Pending work is found by state, never by a sequence watermark: a bid with a
-- lower seq can commit after one with a higher seq.
CREATE INDEX bid_log_pending ON bid_log (auction_id, seq) WHERE status = 'pending';
-- Public bid history, newest first (keyset pagination on seq).
CREATE INDEX bid_log_history ON bid_log (auction_id, seq DESC);
-- GET /api/bids/{id}: a point lookup by bid id.
CREATE INDEX bid_log_by_id ON bid_log (id);

CREATE TABLE idempotency_keys (
    bidder_id       text        NOT NULL,
    key             text        NOT NULL,
    -- The request fingerprint: a replay must name the same auction and amount.
    auction_id      uuid        NOT NULL,
    amount          bigint      NOT NULL,
    bid_id          uuid        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bidder_id, key)
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
