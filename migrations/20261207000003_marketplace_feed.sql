-- The marketplace's events in the event log: every kind but the bidders'
-- per-batch 'bids' rows. The feed (GET /api/events) and the webhook
-- dispatcher page these in log order, (xid, auction_id, n), below the
-- oldest running transaction; this index lets them skip the 'bids' rows,
-- which are almost all of the log in a final minute.
CREATE INDEX events_marketplace ON events (xid, auction_id, n) WHERE kind <> 'bids';
