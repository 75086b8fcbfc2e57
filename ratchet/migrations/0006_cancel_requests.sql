-- Cancelling a running run asks its worker to stop; the run stays `running` (and keeps
-- the one-training slot) until the worker has stopped and marked it `cancelled`.
ALTER TABLE runs ADD COLUMN cancel_requested_at timestamptz;
