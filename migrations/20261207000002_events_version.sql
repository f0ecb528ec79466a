-- The auction version an event row's transaction produced: with the
-- transaction's commit time (track_commit_timestamp), it tells when each
-- version of an auction committed, which the load test's watchers measure
-- their delivery delay from. Null on rows written before this column.
ALTER TABLE events ADD COLUMN version bigint;
