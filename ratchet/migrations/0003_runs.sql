-- Training and evaluation runs, their per-step metrics, and what they produced.

CREATE TABLE runs (
    id            bigserial PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('train', 'eval')),
    status        text NOT NULL CHECK (status IN (
        'queued', 'running', 'succeeded', 'failed', 'cancelled', 'skipped')),
    params        jsonb NOT NULL DEFAULT '{}',
    snapshot_id   bigint REFERENCES snapshots (id),
    adapter_id    uuid REFERENCES adapters (id),
    step          integer NOT NULL DEFAULT 0,
    total_steps   integer,
    heartbeat_at  timestamptz,
    error         text,
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz
);
CREATE INDEX runs_status ON runs (kind, status);

CREATE TABLE run_metrics (
    run_id  bigint NOT NULL REFERENCES runs (id),
    step    integer NOT NULL,
    name    text NOT NULL,
    value   double precision NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step, name)
);

ALTER TABLE adapters ADD COLUMN run_id bigint REFERENCES runs (id);
ALTER TABLE adapters ADD COLUMN snapshot_id bigint REFERENCES snapshots (id);
