-- Webhook delivery: one row per configured URL with the log position up to
-- which its events were queued, and one delivery per event per URL.
--
-- Filling: a process locks a URL's row (FOR UPDATE SKIP LOCKED), reads the
-- marketplace events after its position and below the oldest running
-- transaction (see the events migration: no late commit is skipped),
-- queues them as deliveries and moves the position, in one transaction.
--
-- Delivering: a process claims due deliveries (FOR UPDATE SKIP LOCKED) by
-- setting a lease longer than one attempt's time limit and a lease token,
-- posts them outside any transaction, and records the answer only while
-- the token is still its own. A process killed mid-attempt leaves a lease
-- that expires, and another attempt (same webhook-id) follows.
--
-- The body is stored as signed, so every retry sends the same bytes even
-- after the log row is pruned.

CREATE TABLE webhook_endpoints (
    url        text        PRIMARY KEY,
    -- Every marketplace event before this position is queued for the URL.
    xid        xid8        NOT NULL,
    auction_id uuid        NOT NULL,
    n          smallint    NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    url             text        NOT NULL,
    xid             xid8        NOT NULL,
    auction_id      uuid        NOT NULL,
    n               smallint    NOT NULL,
    event_id        text        NOT NULL,
    event_type      text        NOT NULL,
    -- When the event happened (its transaction's time).
    event_at        timestamptz NOT NULL,
    body            text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    -- Queued (or replayed) at: retries go on for 24 h from here.
    created_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease           uuid,
    lease_until     timestamptz,
    last_error      text,
    finished_at     timestamptz,
    PRIMARY KEY (url, xid, auction_id, n)
);

-- Due deliveries of a URL in log order, and the per-auction order check.
CREATE INDEX webhook_deliveries_pending
    ON webhook_deliveries (url, xid, auction_id, n) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_pending_auction
    ON webhook_deliveries (url, auction_id, xid, n) WHERE status = 'pending';
-- Retention and replay.
CREATE INDEX webhook_deliveries_finished
    ON webhook_deliveries (status, finished_at) WHERE status <> 'pending';
