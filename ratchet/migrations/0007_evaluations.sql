-- The promotion gate: evaluations of a candidate against production, their per-item
-- results, and the promotion chain that rollback walks back along.

CREATE TABLE evaluations (
    id             bigserial PRIMARY KEY,
    adapter_id     uuid NOT NULL REFERENCES adapters (id),
    -- What the candidate was compared with: production when the evaluation ran
    -- (NULL = the base model).
    production_id  uuid REFERENCES adapters (id),
    status         text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    -- Progress for people watching a long job: the stage it is in and how far along.
    stage          text,
    progress       double precision NOT NULL DEFAULT 0,
    decision       text CHECK (decision IN ('pass', 'fail')),
    reasons        jsonb NOT NULL DEFAULT '[]',
    report         jsonb,
    error          text,
    review         text CHECK (review IN ('approved', 'rejected')),
    reviewed_by    text,
    reviewed_at    timestamptz,
    review_note    text,
    requested_by   text NOT NULL DEFAULT 'system',
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    heartbeat_at   timestamptz,
    finished_at    timestamptz
);
CREATE INDEX evaluations_adapter ON evaluations (adapter_id, id);
-- One evaluation of an adapter in flight at a time.
CREATE UNIQUE INDEX evaluations_one_active ON evaluations (adapter_id)
    WHERE status IN ('queued', 'running');

-- Per-item evidence, both models side by side: benchmark items, greedy answers,
-- held-out pairs, judge verdicts.
CREATE TABLE eval_items (
    evaluation_id  bigint NOT NULL REFERENCES evaluations (id) ON DELETE CASCADE,
    suite          text NOT NULL,
    item           text NOT NULL,
    production     jsonb NOT NULL,
    candidate      jsonb NOT NULL,
    PRIMARY KEY (evaluation_id, suite, item)
);

-- Each promotions row is a production state; `previous_id` is the state it replaced,
-- so a rollback restores that state (with its own previous), and can be repeated.
ALTER TABLE promotions ADD COLUMN kind text NOT NULL DEFAULT 'promote'
    CHECK (kind IN ('promote', 'rollback'));
ALTER TABLE promotions ADD COLUMN forced boolean NOT NULL DEFAULT false;
ALTER TABLE promotions ADD COLUMN evaluation_id bigint REFERENCES evaluations (id);
ALTER TABLE promotions ADD COLUMN previous_id bigint REFERENCES promotions (id);

-- Who did what to production and to reports, and when. Append-only.
CREATE TABLE audit (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    action   text NOT NULL,
    subject  text NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_subject ON audit (subject, id);
