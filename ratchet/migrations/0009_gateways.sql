-- Gateway processes, so that a stream left 'streaming' by a gateway that died (kill -9,
-- a lost node) is swept to 'aborted' by one that is alive.
CREATE TABLE gateways (
    id          uuid PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);

-- No foreign key: a gateway that starts while the database is down spools its answers
-- before it could register itself.
ALTER TABLE completions ADD COLUMN gateway_id uuid;
CREATE INDEX completions_streaming ON completions (gateway_id) WHERE status = 'streaming';
