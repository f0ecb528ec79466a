-- Vacuum never truncates the queue of pending bids.
--
-- A vacuum that finds empty pages at the end of a table truncates them,
-- which needs an ACCESS EXCLUSIVE lock. On the queue, every append and
-- every resolver batch holds a lock at all times, so the vacuum retries
-- for up to 5 s; each time it gets the lock it stalls both (and the lock
-- is replayed on every standby). The queue's pages are reused by the next
-- burst anyway.
ALTER TABLE pending_bids SET (vacuum_truncate = false);
