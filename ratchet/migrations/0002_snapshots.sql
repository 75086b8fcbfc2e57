-- Preference-dataset snapshots: immutable, with every pair traceable to its votes.

-- The prompt of a logged conversation: messages up to the last user turn, each as
-- {role, content} with text parts joined and trimmed (feedback/prompts.py in SQL).
CREATE FUNCTION ratchet_prompt(messages jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'role', m ->> 'role',
               'content', btrim(CASE jsonb_typeof(m -> 'content')
                   WHEN 'string' THEN m ->> 'content'
                   WHEN 'array' THEN coalesce((SELECT string_agg(p ->> 'text', '' ORDER BY k)
                                               FROM jsonb_array_elements(m -> 'content')
                                                    WITH ORDINALITY AS q (p, k)), '')
                   ELSE '' END, E' \t\n\r'))
               ORDER BY i), '[]'::jsonb)
    FROM jsonb_array_elements(messages) WITH ORDINALITY AS t (m, i)
    -- Up to the last user turn; the whole conversation when there is none.
    WHERE i <= coalesce((SELECT max(j) FROM jsonb_array_elements(messages)
                         WITH ORDINALITY AS u (n, j) WHERE n ->> 'role' = 'user'),
                        jsonb_array_length(messages))
$$;

CREATE TABLE snapshots (
    id              bigserial PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Votes and choices recorded up to this instant were considered.
    cutoff          timestamptz NOT NULL,
    settings        jsonb NOT NULL,
    counts          jsonb NOT NULL,
    content_sha256  text NOT NULL,
    path            text NOT NULL,
    files           jsonb NOT NULL
);

CREATE TABLE pairs (
    -- Deferred: a build writes its pairs first and its snapshot row last.
    snapshot_id    bigint NOT NULL REFERENCES snapshots (id) DEFERRABLE INITIALLY DEFERRED,
    -- sha256 of (prompt hash, normalized chosen, normalized rejected): the same pair
    -- has the same id in every snapshot.
    id             text NOT NULL,
    split          text NOT NULL CHECK (split IN ('train', 'test')),
    rule           text NOT NULL CHECK (rule IN ('choice', 'correction', 'thumbs')),
    prompt_sha256  text NOT NULL,
    prompt         jsonb NOT NULL,
    chosen         text NOT NULL,
    rejected       text NOT NULL,
    PRIMARY KEY (snapshot_id, id)
);

-- One row per (pair, answer behind it): the votes on that answer that the pair rests
-- on, or the comparison it came from. Arrays rather than a row per vote keep a large
-- build to a few hundred thousand rows instead of millions. No foreign keys on
-- purpose: rows are made by joins on those very tables in the build's own
-- transaction, and FK trigger checks would double its time.
CREATE TABLE pair_sources (
    snapshot_id    bigint NOT NULL,
    pair_id        text NOT NULL,
    completion_id  uuid NOT NULL,
    vote_ids       bigint[] NOT NULL DEFAULT '{}',
    comparison_id  uuid,
    CHECK (cardinality(vote_ids) > 0 OR comparison_id IS NOT NULL)
);
CREATE INDEX pair_sources_pair ON pair_sources (snapshot_id, pair_id);

-- Unpaired signal for KTO: answers with only ups or only downs (by net score) that
-- made no pair, and both answers of a comparison judged both_bad.
CREATE TABLE kto_rows (
    snapshot_id    bigint NOT NULL REFERENCES snapshots (id) DEFERRABLE INITIALLY DEFERRED,
    completion_id  uuid NOT NULL REFERENCES completions (id),
    split          text NOT NULL CHECK (split IN ('train', 'test')),
    prompt_sha256  text NOT NULL,
    prompt         jsonb NOT NULL,
    completion     text NOT NULL,
    label          boolean NOT NULL,
    PRIMARY KEY (snapshot_id, completion_id)
);

CREATE INDEX votes_updated_at ON votes (updated_at);
CREATE INDEX comparisons_decided_at ON comparisons (decided_at);
