-- At most one training queued or running at a time, enforced by the database, so
-- that racing requests (API, cron, CLI, several workers) can never start two.
CREATE UNIQUE INDEX runs_one_active_training ON runs (kind)
    WHERE kind = 'train' AND status IN ('queued', 'running');

-- Where a running run lives, so that a dead worker on this host is seen at once.
ALTER TABLE runs ADD COLUMN worker_host text;
ALTER TABLE runs ADD COLUMN worker_pid integer;
