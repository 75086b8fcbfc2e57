-- Keys, the adapter registry, and the answer log with its votes and comparisons.

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    role        text NOT NULL CHECK (role IN ('chat', 'reviewer', 'ops')),
    key_sha256  text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Adapters are content-addressed: sha256 covers adapter_config.json + weights, and
-- engine_name is derived from it, so a new adapter never reuses an old engine name.
CREATE TABLE adapters (
    id                 uuid PRIMARY KEY,
    sha256             text NOT NULL UNIQUE,
    engine_name        text NOT NULL UNIQUE,
    path               text NOT NULL,
    base_model_sha256  text,
    status             text NOT NULL CHECK (status IN (
        'candidate', 'evaluating', 'rejected', 'passed', 'awaiting_review',
        'production', 'retired')),
    source             text NOT NULL DEFAULT 'manual',
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- Append-only audit. Production is the target of the latest row (NULL = the base).
CREATE TABLE promotions (
    id               bigserial PRIMARY KEY,
    from_adapter_id  uuid REFERENCES adapters (id),
    to_adapter_id    uuid REFERENCES adapters (id),
    actor            text NOT NULL,
    reason           text NOT NULL DEFAULT '',
    at               timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE completions (
    id                 uuid PRIMARY KEY,
    created_at         timestamptz NOT NULL DEFAULT now(),
    key_id             uuid REFERENCES api_keys (id),
    end_user           text,
    public_model       text NOT NULL,
    engine_model       text NOT NULL,
    adapter_id         uuid REFERENCES adapters (id),
    adapter_sha256     text,
    base_model_sha256  text,
    messages           jsonb NOT NULL,
    params             jsonb NOT NULL,
    prompt_sha256      text NOT NULL,
    stream             boolean NOT NULL,
    -- 'streaming' while a streamed answer is still being sent; 'complete' when done;
    -- 'aborted' when the client went away or the engine failed mid-stream.
    status             text NOT NULL CHECK (status IN ('streaming', 'complete', 'aborted')),
    output             text,
    finish_reason      text,
    prompt_tokens      integer,
    completion_tokens  integer,
    latency_ms         double precision
);
CREATE INDEX completions_created_at ON completions (created_at);
CREATE INDEX completions_prompt_sha256 ON completions (prompt_sha256);

CREATE TABLE votes (
    id             bigserial PRIMARY KEY,
    completion_id  uuid NOT NULL REFERENCES completions (id),
    end_user       text NOT NULL DEFAULT '',
    key_id         uuid REFERENCES api_keys (id),
    rating         smallint NOT NULL CHECK (rating IN (-1, 1)),
    comment        text,
    correction     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (completion_id, end_user)
);

CREATE TABLE comparisons (
    id            uuid PRIMARY KEY,
    created_at    timestamptz NOT NULL DEFAULT now(),
    key_id        uuid REFERENCES api_keys (id),
    end_user      text,
    messages      jsonb NOT NULL,
    params        jsonb NOT NULL,
    completion_a  uuid NOT NULL REFERENCES completions (id),
    completion_b  uuid NOT NULL REFERENCES completions (id),
    choice        text CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    chooser       text,
    decided_at    timestamptz
);
