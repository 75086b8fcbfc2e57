-- Untrusted clients: quotas and scopes on keys, voters namespaced by key, report
-- sessions kept server-side, and the secret that signs feedback tokens.

-- NULL: the settings' default. `scopes` grants extras beyond the role ('candidate').
ALTER TABLE api_keys
    ADD COLUMN rpm          integer CHECK (rpm > 0),
    ADD COLUMN tpm          integer CHECK (tpm > 0),
    ADD COLUMN concurrency  integer CHECK (concurrency > 0),
    ADD COLUMN scopes       text[] NOT NULL DEFAULT '{}';

-- The voter is (key, end user): end users are namespaced by the key that names them.
ALTER TABLE votes DROP CONSTRAINT IF EXISTS votes_completion_id_end_user_key;
CREATE UNIQUE INDEX votes_voter ON votes (completion_id, key_id, end_user) NULLS NOT DISTINCT;
-- Before this migration any key could vote on any answer. Votes a key cast on answers
-- another key received (ops keys excepted) are set aside, out of every future snapshot.
CREATE TABLE votes_quarantine (
    LIKE votes INCLUDING DEFAULTS,
    quarantined_at  timestamptz NOT NULL DEFAULT now(),
    reason          text NOT NULL
);
WITH moved AS (
    DELETE FROM votes v USING completions c, api_keys k
    WHERE c.id = v.completion_id AND k.id = v.key_id AND k.role <> 'ops'
      AND c.key_id IS DISTINCT FROM v.key_id
    RETURNING v.*
)
INSERT INTO votes_quarantine SELECT m.*, now(), 'not_the_answers_key' FROM moved m;

-- Caps per voter per day count these.
CREATE INDEX votes_voter_day ON votes (key_id, end_user, created_at);
ALTER TABLE comparisons ADD COLUMN chooser_key_id uuid REFERENCES api_keys (id);
CREATE INDEX comparisons_chooser_day ON comparisons (chooser_key_id, chooser, decided_at)
    WHERE decided_at IS NOT NULL;

-- Reviewers' browser sessions: the random id is kept only as its sha256.
CREATE TABLE report_sessions (
    id_sha256     text PRIMARY KEY,
    key_id        uuid NOT NULL REFERENCES api_keys (id),
    csrf_token    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    ended_at      timestamptz
);

-- Secrets the gateways share when the settings give none (the feedback-token key).
CREATE TABLE server_secrets (
    name        text PRIMARY KEY,
    value       bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
