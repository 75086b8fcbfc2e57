"""The pair rules, each one SQL statement over the temporary tables of one build.

The build first makes `answers` (every answer someone voted on or compared, with its
net score and, if it may not be used, why) and an empty `candidates` table. Each
rule below adds candidate pairs; `voter_cap` then limits what one voter made, and
`merge` drops identical and duplicate pairs, splits by prompt hash and keeps the
rest. Every dropped row is counted by reason.
"""

from typing import Any

from psycopg import Connection

from ratchet.config import PairSettings

# Chosen text shorter than this many tokens is dropped. Corrections carry no token
# count, so theirs is estimated at 4 characters a token.
_CHARS_PER_TOKEN = 4
# Which rule a merged duplicate keeps: the most direct evidence first.
PRIORITY = {"choice": 1, "correction": 2, "thumbs": 3}


def _norm(column: str) -> str:
    """SQL: the text as compared for sameness (case and runs of whitespace ignored)."""
    return f"lower(btrim(regexp_replace({column}, '\\s+', ' ', 'g')))"


def _split(column: str) -> str:
    """SQL: 'test' for a held-out prompt hash, else 'train' (deterministic, by hash)."""
    return (
        f"CASE WHEN ('x' || substr({column}, 1, 8))::bit(32)::bigint %% 10000"
        " < %(held_out)s THEN 'test' ELSE 'train' END"
    )


def params(settings: PairSettings, production_id: Any) -> dict[str, Any]:
    return {
        "k": settings.pairs_per_prompt,
        "min_tokens": settings.min_answer_tokens,
        "min_chars": settings.min_answer_tokens * _CHARS_PER_TOKEN,
        "max_prompt": settings.max_prompt_tokens,
        "held_out": round(settings.held_out_fraction * 10000),
        "all_models": settings.models == "all",
        "production": production_id,
        "voter_share": settings.max_voter_share,
        "voter_floor": settings.min_voter_pairs,
    }


def answers(conn: Connection[Any], p: dict[str, Any]) -> None:
    """Every voted or compared answer, with its net score (ups minus downs) and, when it
    may not be used, the reason: `incomplete_answer`, `stale_model` (not from the
    current production model or the base, unless `models: all`), `long_prompt` (over
    `max_prompt_tokens`), `short_answer` (under `min_answer_tokens`)."""
    conn.execute(
        f"""
        CREATE TEMP TABLE answers ON COMMIT DROP AS
        WITH scored AS (
            SELECT completion_id AS id, sum(rating)::int AS net,
                   array_agg(id) AS vote_ids
            FROM votes GROUP BY completion_id
        ), compared AS (
            SELECT completion_a AS id FROM comparisons WHERE choice IS NOT NULL
            UNION SELECT completion_b FROM comparisons WHERE choice IS NOT NULL
        ), touched AS (SELECT id FROM scored UNION SELECT id FROM compared)
        SELECT c.id, c.prompt_sha256, c.messages, c.output,
               md5({_norm("coalesce(c.output, '')")}) AS norm,
               coalesce(s.net, 0) AS net, coalesce(s.vote_ids, '{{}}') AS vote_ids,
               CASE
                 WHEN c.status <> 'complete' OR c.output IS NULL THEN 'incomplete_answer'
                 WHEN NOT (%(all_models)s OR c.adapter_id IS NULL
                           OR c.adapter_id IS NOT DISTINCT FROM %(production)s) THEN 'stale_model'
                 WHEN coalesce(c.prompt_tokens, 0) > %(max_prompt)s THEN 'long_prompt'
                 WHEN coalesce(c.completion_tokens, 0) < %(min_tokens)s THEN 'short_answer'
               END AS dropped
        FROM touched t JOIN completions c ON c.id = t.id
        LEFT JOIN scored s ON s.id = t.id
        """,
        p,
    )
    conn.execute("CREATE INDEX ON answers (prompt_sha256)")
    conn.execute("ANALYZE answers")  # temp tables are never auto-analyzed
    conn.execute(
        """
        CREATE TEMP TABLE candidates (
            rule text NOT NULL, prompt_sha256 text NOT NULL,
            chosen_id uuid, rejected_id uuid NOT NULL,
            chosen_text text,  -- only when the chosen text is no logged answer (corrections)
            ch text NOT NULL, rh text NOT NULL,  -- md5 of the normalized texts
            chosen_votes bigint[] NOT NULL, rejected_votes bigint[] NOT NULL,
            comparison_id uuid, dropped text,
            cid bigint GENERATED ALWAYS AS IDENTITY  -- last: the rules insert by position
        ) ON COMMIT DROP
        """
    )


def choice_pairs(conn: Connection[Any], p: dict[str, Any]) -> None:
    """Pairwise choice: the winner is chosen, the loser rejected. `tie` and `both_bad`
    make no pair (`both_bad` answers become KTO negatives instead). A pair with an
    answer that may not be used is dropped with that answer's reason."""
    conn.execute(
        """
        INSERT INTO candidates
        SELECT 'choice', w.prompt_sha256, w.id, l.id, NULL, w.norm, l.norm, '{}', '{}', c.id,
               coalesce(w.dropped, l.dropped)
        FROM comparisons c
        JOIN answers w ON w.id = CASE c.choice WHEN 'a' THEN c.completion_a ELSE c.completion_b END
        JOIN answers l ON l.id = CASE c.choice WHEN 'a' THEN c.completion_b ELSE c.completion_a END
        WHERE c.choice IN ('a', 'b')
        """,
        p,
    )


def correction_pairs(conn: Connection[Any], p: dict[str, Any]) -> None:
    """Correction: the user's corrected answer is chosen, the original rejected. The
    correction must itself pass the length filter (estimated at 4 chars a token)."""
    conn.execute(
        f"""
        INSERT INTO candidates
        SELECT 'correction', a.prompt_sha256, NULL, a.id, btrim(v.correction),
               md5({_norm("v.correction")}), a.norm, '{{}}', ARRAY[v.id], NULL,
               coalesce(a.dropped, CASE WHEN char_length(btrim(v.correction)) < %(min_chars)s
                                        THEN 'short_answer' END)
        FROM votes v JOIN answers a ON a.id = v.completion_id
        WHERE {_norm("coalesce(v.correction, '')")} <> ''
        """,
        p,
    )


def thumbs_pairs(conn: Connection[Any], p: dict[str, Any]) -> None:
    """Thumbs: for the same prompt (hash of the conversation up to the last user turn),
    every answer with a positive net score against every answer with a negative one.
    An answer voted both ways counts by its net score; a net of 0 is dropped
    (`net_zero`). At most K pairs per prompt are kept (`pairs_per_prompt`), the widest
    margins first, ties broken by a hash of the two answer ids; the rest are
    `over_cap`."""
    conn.execute(
        """
        INSERT INTO candidates
        SELECT 'thumbs', prompt_sha256, up_id, down_id, NULL, up_norm, down_norm, up_votes,
               down_votes, NULL,
               CASE WHEN up_norm = down_norm THEN 'identical' WHEN rank > %(k)s THEN 'over_cap' END
        FROM (
            SELECT u.prompt_sha256, u.id AS up_id, d.id AS down_id, u.norm AS up_norm,
                   d.norm AS down_norm, u.vote_ids AS up_votes, d.vote_ids AS down_votes,
                   -- identical texts are ranked apart: they must not take a capped slot
                   row_number() OVER (PARTITION BY u.prompt_sha256, u.norm = d.norm
                       ORDER BY u.net - d.net DESC, md5(u.id::text || d.id::text)) AS rank
            FROM answers u JOIN answers d ON d.prompt_sha256 = u.prompt_sha256
            WHERE u.net > 0 AND d.net < 0 AND u.dropped IS NULL AND d.dropped IS NULL

        ) ranked
        """,
        p,
    )


def _pair_key(alias: str) -> str:
    """SQL: one pair's identity (prompt, chosen text, rejected text), as `merge` sees it."""
    return f"md5({alias}.prompt_sha256 || ':' || {alias}.ch || ':' || {alias}.rh)"


def voter_cap(conn: Connection[Any], p: dict[str, Any]) -> None:
    """One voter (key, end user) makes at most `max_voter_share` of the snapshot's pairs,
    counted against the pairs the other voters make (before anything is dropped here),
    and never fewer than `min_voter_pairs`. A pair is made by every voter behind it:
    the votes on both answers of a thumbs pair, the vote carrying a correction, the
    chooser of a comparison. Over the cap, the voter's pairs are dropped in a fixed
    order (by the hash of the pair) as `voter_cap`, and their answers give no KTO rows
    either. Voters are namespaced by key, so one key's many end users are many voters:
    the day cap and the one-vote-per-answer rule bound those."""
    if p["voter_share"] >= 1:
        return
    conn.execute(
        f"""
        CREATE TEMP TABLE candidate_voters ON COMMIT DROP AS
        SELECT c.cid, {_pair_key("c")} AS pair, v.key_id, v.end_user
        FROM candidates c
        CROSS JOIN LATERAL unnest(c.chosen_votes || c.rejected_votes) AS u (vote_id)
        JOIN votes v ON v.id = u.vote_id
        WHERE c.dropped IS NULL AND c.ch <> c.rh
        UNION
        SELECT c.cid, {_pair_key("c")}, x.chooser_key_id, coalesce(x.chooser, '')
        FROM candidates c JOIN comparisons x ON x.id = c.comparison_id
        WHERE c.dropped IS NULL AND c.ch <> c.rh
        """
    )
    conn.execute(
        f"""
        WITH total AS (
            SELECT count(DISTINCT {_pair_key("c")}) AS n FROM candidates c
            WHERE c.dropped IS NULL AND c.ch <> c.rh
        ), mine AS (
            SELECT key_id, end_user, count(DISTINCT pair) AS n
            FROM candidate_voters GROUP BY key_id, end_user
        ), allowed AS (
            -- mine <= share * (mine + others)  <=>  mine <= share / (1 - share) * others
            SELECT m.key_id, m.end_user,
                   greatest(%(voter_floor)s,
                            floor(%(voter_share)s / (1 - %(voter_share)s) * (t.n - m.n))) AS cap
            FROM mine m CROSS JOIN total t
        ), ranked AS (
            SELECT cv.cid, a.cap,
                   dense_rank() OVER (PARTITION BY cv.key_id, cv.end_user
                                      ORDER BY md5(cv.pair)) AS rank
            FROM candidate_voters cv
            JOIN allowed a ON a.key_id IS NOT DISTINCT FROM cv.key_id
                          AND a.end_user = cv.end_user
        )
        UPDATE candidates SET dropped = 'voter_cap'
        WHERE cid IN (SELECT cid FROM ranked WHERE rank > cap)
        """,
        p,
    )


def merge(conn: Connection[Any], p: dict[str, Any], snapshot_id: int) -> None:
    """Drops pairs whose chosen and rejected texts are equal after normalization
    (`identical`) and merges duplicates of one (prompt, chosen, rejected), keeping the
    most direct rule and every source (`duplicate` counts the merged extras). Splits by
    prompt hash and writes `pairs` and `pair_sources` under `snapshot_id`."""
    conn.execute(
        """
        CREATE TEMP TABLE kept ON COMMIT DROP AS
        SELECT encode(sha256(convert_to(prompt_sha256 || ':' || ch || ':' || rh, 'UTF8')),
                      'hex') AS pair_id, *
        FROM candidates WHERE dropped IS NULL AND ch <> rh
        """
    )
    # The prompt text once per prompt, not once per pair.
    conn.execute(
        """
        CREATE TEMP TABLE prompts ON COMMIT DROP AS
        SELECT prompt_sha256, ratchet_prompt(messages) AS prompt FROM (
            SELECT DISTINCT ON (a.prompt_sha256) a.prompt_sha256, a.messages
            FROM (SELECT DISTINCT prompt_sha256 FROM kept) k
            JOIN answers a ON a.prompt_sha256 = k.prompt_sha256
            ORDER BY a.prompt_sha256, a.id
        ) one_per_prompt
        """
    )
    order = "CASE rule WHEN 'choice' THEN 1 WHEN 'correction' THEN 2 ELSE 3 END"
    conn.execute(
        f"""
        INSERT INTO pairs (snapshot_id, id, split, rule, prompt_sha256, prompt, chosen, rejected)
        SELECT %(snapshot)s, pair_id, {_split("k.prompt_sha256")}, rule, k.prompt_sha256,
               pr.prompt, coalesce(k.chosen_text, ca.output), ra.output
        FROM (SELECT DISTINCT ON (pair_id) * FROM kept
              ORDER BY pair_id, {order}, rejected_id, chosen_id, chosen_text) k
        JOIN prompts pr ON pr.prompt_sha256 = k.prompt_sha256
        JOIN answers ra ON ra.id = k.rejected_id
        LEFT JOIN answers ca ON ca.id = k.chosen_id
        """,
        {**p, "snapshot": snapshot_id},
    )
    conn.execute(
        """
        INSERT INTO pair_sources (snapshot_id, pair_id, completion_id, vote_ids, comparison_id)
        -- thumbs: every vote on either answer (links made distinct: merged duplicates
        -- can share an answer)
        SELECT %(snapshot)s, l.pair_id, a.id, a.vote_ids, NULL::uuid
        FROM (SELECT pair_id, chosen_id AS id FROM kept WHERE rule = 'thumbs'
              UNION SELECT pair_id, rejected_id FROM kept WHERE rule = 'thumbs') l
        JOIN answers a ON a.id = l.id
        UNION ALL  -- corrections: the vote that carried the correction
        SELECT %(snapshot)s, pair_id, rejected_id, rejected_votes, NULL
        FROM kept WHERE rule = 'correction'
        UNION ALL  -- choices: the comparison, once for each answer
        SELECT %(snapshot)s, k.pair_id, x.completion_id, '{}', k.comparison_id
        FROM kept k CROSS JOIN LATERAL (VALUES (k.chosen_id), (k.rejected_id)) AS x (completion_id)
        WHERE k.rule = 'choice'
        """,
        {"snapshot": snapshot_id},
    )


def kto_rows(conn: Connection[Any], p: dict[str, Any], snapshot_id: int) -> None:
    """Unpaired votes for KTO: usable answers with a non-zero net score that are in no
    pair (nor in a pair dropped as `voter_cap`), labelled by the sign of their score,
    plus both answers of every `both_bad` comparison as negatives. Split by prompt hash
    like the pairs."""
    conn.execute(
        "CREATE TEMP TABLE paired ON COMMIT DROP AS"
        " SELECT chosen_id AS id FROM kept WHERE chosen_id IS NOT NULL"
        " UNION SELECT rejected_id FROM kept"
        # what a voter made over the cap is not let in again as KTO rows
        " UNION SELECT chosen_id FROM candidates"
        "  WHERE dropped = 'voter_cap' AND chosen_id IS NOT NULL"
        " UNION SELECT rejected_id FROM candidates WHERE dropped = 'voter_cap'"
    )
    conn.execute(
        f"""
        INSERT INTO kto_rows (snapshot_id, completion_id, split, prompt_sha256, prompt,
                              completion, label)
        SELECT DISTINCT ON (a.id) %(snapshot)s, a.id, {_split("a.prompt_sha256")},
               a.prompt_sha256, ratchet_prompt(a.messages), a.output, label
        FROM (
            SELECT id, net > 0 AS label, 1 AS source FROM answers
            WHERE net <> 0 AND dropped IS NULL
            UNION ALL
            SELECT unnest(ARRAY[completion_a, completion_b]), false, 2
            FROM comparisons WHERE choice = 'both_bad'
        ) s JOIN answers a ON a.id = s.id
        WHERE a.dropped IS NULL AND NOT EXISTS (SELECT 1 FROM paired WHERE paired.id = a.id)
        ORDER BY a.id, s.source
        """,
        {**p, "snapshot": snapshot_id},
    )


RULES = (choice_pairs, correction_pairs, thumbs_pairs)
