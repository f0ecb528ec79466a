-- An auction created to start later is not `opened` until its start, when
-- the resolver marks it and bumps its version: the view's status turns from
-- `scheduled` to `open`, so its ETag must change too.
ALTER TABLE auctions ADD COLUMN opened boolean NOT NULL DEFAULT true;

CREATE INDEX auctions_to_open ON auctions (starts_at) WHERE NOT opened;
