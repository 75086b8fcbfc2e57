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
    """SQL: the text as compared for sameness (case and runs of whitespace ignored):
    `lower(btrim(regexp_replace(text, '\\s+', ' ', 'g')))`.

    The replace is the costly part (one regex call per whitespace run, seconds over
    200k answers), so it runs only when a text has a whitespace run or whitespace other
    than a space or a newline. Otherwise every run is one space or one newline, and
    turning newlines into spaces gives the same text."""
    return (
        f"lower(btrim(CASE WHEN {column} ~ '{_NEEDS_REGEX}'"
        f" THEN regexp_replace({column}, '\\s+', ' ', 'g')"
        f" ELSE replace({column}, E'\\n', ' ') END))"
    )


# SQL regex: two whitespace characters in a row, or one that is neither ' ' nor '\n'.
_NEEDS_REGEX = "\\s\\s|(?![ \\n])\\s"


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
    # `norm` is only ever compared for answers that may be used: a pair with a dropped
    # answer is dropped whatever its texts, so theirs is not computed (''). The texts
    # themselves stay in `completions`: the few rows written out fetch them by id.
    conn.execute(
        f"""
        CREATE TEMP TABLE answers ON COMMIT DROP AS
        WITH scored AS (
            SELECT completion_id AS id, sum(rating)::int AS net, count(*)::int AS votes
            FROM votes GROUP BY completion_id
        ), compared AS (
            SELECT completion_a AS id FROM comparisons WHERE choice IS NOT NULL
            UNION SELECT completion_b FROM comparisons WHERE choice IS NOT NULL
        ), touched AS (
            SELECT coalesce(s.id, x.id) AS id, coalesce(s.net, 0) AS net,
                   coalesce(s.votes, 0) AS votes
            FROM scored s FULL JOIN compared x ON x.id = s.id
        ), checked AS (
            SELECT c.id, c.prompt_sha256, c.output, t.net, t.votes,
                   CASE
                     WHEN c.status <> 'complete' OR c.output IS NULL THEN 'incomplete_answer'
                     WHEN NOT (%(all_models)s OR c.adapter_id IS NULL
                               OR c.adapter_id IS NOT DISTINCT FROM %(production)s)
                       THEN 'stale_model'
                     WHEN coalesce(c.prompt_tokens, 0) > %(max_prompt)s THEN 'long_prompt'
                     WHEN coalesce(c.completion_tokens, 0) < %(min_tokens)s THEN 'short_answer'
                   END AS dropped
            FROM touched t JOIN completions c ON c.id = t.id
        )
        SELECT id, prompt_sha256,
               CASE WHEN dropped IS NULL THEN md5({_norm("output")}) ELSE '' END AS norm,
               net, votes, dropped
        FROM checked
        """,
        p,
    )
    conn.execute("CREATE INDEX ON answers (prompt_sha256)")
    conn.execute("ANALYZE answers")  # temp tables are never auto-analyzed
    conn.execute(
        f"""
        CREATE TEMP TABLE candidates (
            rule text NOT NULL, prompt_sha256 text NOT NULL,
            chosen_id uuid, rejected_id uuid NOT NULL,
            chosen_text text,  -- only when the chosen text is no logged answer (corrections)
            ch text NOT NULL, rh text NOT NULL,  -- md5 of the normalized texts
            -- the vote behind a correction; a thumbs pair rests on every vote on its two
            -- answers (all their votes), a choice on its comparison
            vote_id bigint,
            comparison_id uuid, dropped text,
            -- last: the rules insert by position
            cid bigint GENERATED ALWAYS AS IDENTITY,
            -- orders a voter's pairs in `voter_cap`: the hash of the pair key, as a uuid
            -- (it sorts as its hex text does, and fast); one-to-one with the pair key
            ord uuid GENERATED ALWAYS AS (md5({_pair_key()})::uuid) STORED
        ) ON COMMIT DROP
        """
    )
    # Dropped candidates counted without a row each (thumbs pairs over the cap per prompt).
    conn.execute(
        "CREATE TEMP TABLE set_aside (reason text NOT NULL, n bigint NOT NULL) ON COMMIT DROP"
    )


def choice_pairs(conn: Connection[Any], p: dict[str, Any]) -> None:
    """Pairwise choice: the winner is chosen, the loser rejected. `tie` and `both_bad`
    make no pair (`both_bad` answers become KTO negatives instead). A pair with an
    answer that may not be used is dropped with that answer's reason."""
    conn.execute(
        """
        INSERT INTO candidates
        SELECT 'choice', w.prompt_sha256, w.id, l.id, NULL, w.norm, l.norm, NULL, c.id,
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
               md5({_norm("v.correction")}), a.norm, v.id, NULL,
               coalesce(a.dropped, CASE WHEN char_length(btrim(v.correction)) < %(min_chars)s
                                        THEN 'short_answer' END)
        FROM votes v JOIN answers a ON a.id = v.completion_id
        -- (a NULL correction normalizes to '': the first test only spares the second)
        WHERE v.correction IS NOT NULL AND {_norm("v.correction")} <> ''
        """,
        p,
    )


def thumbs_pairs(conn: Connection[Any], p: dict[str, Any]) -> None:
    """Thumbs: for the same prompt (hash of the conversation up to the last user turn),
    every answer with a positive net score against every answer with a negative one.
    An answer voted both ways counts by its net score; a net of 0 is dropped
    (`net_zero`). At most K pairs per prompt are kept (`pairs_per_prompt`), the widest
    margins first, ties broken by a hash of the two answer ids; the rest are
    `over_cap` (only counted: most of a large build's thumbs pairs are)."""
    conn.execute(
        """
        WITH ranked AS MATERIALIZED (
        SELECT prompt_sha256, up_id, down_id, up_norm, down_norm,
               CASE WHEN up_norm = down_norm THEN 'identical' WHEN rank > %(k)s THEN 'over_cap' END
               AS dropped
        FROM (
            SELECT u.prompt_sha256, u.id AS up_id, d.id AS down_id, u.norm AS up_norm,
                   d.norm AS down_norm,
                   -- identical texts are ranked apart: they must not take a capped slot.
                   -- (Partitions need only equality, so the hash is compared bytewise.
                   -- The tie-break hashes the two uuids as they are: md5 of their text
                   -- took 1.4 s of 3.7 s at 1M votes.)
                   row_number() OVER (PARTITION BY u.prompt_sha256 COLLATE "C", u.norm = d.norm
                       ORDER BY u.net - d.net DESC,
                                uuid_hash_extended(d.id, uuid_hash_extended(u.id, 0))) AS rank
            FROM answers u JOIN answers d ON d.prompt_sha256 = u.prompt_sha256
            WHERE u.net > 0 AND d.net < 0 AND u.dropped IS NULL AND d.dropped IS NULL
        ) r
        ), made AS (
            INSERT INTO candidates
            SELECT 'thumbs', prompt_sha256, up_id, down_id, NULL, up_norm, down_norm, NULL, NULL,
                   dropped
            FROM ranked WHERE dropped IS DISTINCT FROM 'over_cap'
        )
        INSERT INTO set_aside
        SELECT 'over_cap', count(*) FROM ranked WHERE dropped = 'over_cap' HAVING count(*) > 0
        """,
        p,
    )


def _pair_key() -> str:
    """SQL: one pair's identity (prompt, chosen text, rejected text), as `merge` sees it."""
    return "md5(prompt_sha256 || ':' || ch || ':' || rh)"


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
    conn.execute("ANALYZE candidates")  # unanalyzed, it is planned as a few rows
    # `live` is planned as a few rows (a CTE), so each of its answers' votes would be
    # looked up by index (seconds of random reads at 1M votes, where one pass over
    # `votes` takes a fraction of a second), and its links made distinct by a sort
    # (a hash is 3x faster here). The windows still sort, as they must.
    conn.execute("SET LOCAL enable_nestloop = off")
    conn.execute("SET LOCAL enable_sort = off")
    conn.execute(_VOTER_CAP, p)
    conn.execute("RESET enable_nestloop")
    conn.execute("RESET enable_sort")


# A voter is named by a 64-bit hash of (key, end user), so that the links are sorted and
# hashed as integers and a uuid, not two uuids and a text; two voters would share a
# hash with odds of about 1 in 10^7 at a million voters. The thumbs links come from one
# hash join over `votes` (both answers of a pair at once). Only voters who may be over
# their cap are ranked: a voter's link count bounds its distinct pairs from above, and
# a voter whose bound is within the cap that bound allows is within its own.
_VOTER = "hashtextextended(coalesce({k}::text, '-') || ':' || {u}, 0)"
_LIVE = "dropped IS NULL AND ch <> rh"
_VOTER_CAP = f"""
    WITH live AS MATERIALIZED (  -- live candidates, numbered in the fixed order (equal
        -- pair keys share a number: one pair)
        SELECT cid, rule, chosen_id, rejected_id, vote_id, comparison_id,
               dense_rank() OVER (ORDER BY ord) AS pos
        FROM candidates WHERE {_LIVE}
    ), links AS MATERIALIZED (  -- (voter, pair): the voters behind each live candidate
        SELECT DISTINCT voter, cid, pos FROM (
            SELECT {_VOTER.format(k="v.key_id", u="v.end_user")} AS voter, s.cid, s.pos
            FROM votes v JOIN (
                SELECT cid, pos, chosen_id AS answer FROM live WHERE rule = 'thumbs'
                UNION ALL SELECT cid, pos, rejected_id FROM live WHERE rule = 'thumbs'
            ) s ON s.answer = v.completion_id
            UNION ALL
            SELECT {_VOTER.format(k="v.key_id", u="v.end_user")}, l.cid, l.pos
            FROM candidates c JOIN live l USING (cid) JOIN votes v ON v.id = c.vote_id
            WHERE c.vote_id IS NOT NULL
            UNION ALL
            SELECT {_VOTER.format(k="x.chooser_key_id", u="coalesce(x.chooser, '')")},
                   l.cid, l.pos
            FROM candidates c JOIN live l USING (cid) JOIN comparisons x ON x.id = c.comparison_id
            WHERE c.comparison_id IS NOT NULL
        ) each_link
    ), total AS (
        SELECT max(pos) AS n FROM live
    ), suspects AS (  -- mine <= share * (mine + others) <=> mine <= share/(1-share) * others
        SELECT voter FROM (SELECT voter, count(*) AS n FROM links GROUP BY voter) u, total t
        WHERE u.n > greatest(%(voter_floor)s,
                             floor(%(voter_share)s / (1 - %(voter_share)s) * (t.n - u.n)))
    ), ranked AS (
        -- A suspect's pairs in the fixed order, and how many it has.
        SELECT cid, rank, max(rank) OVER (PARTITION BY voter) AS mine
        FROM (SELECT l.cid, l.voter, dense_rank() OVER (PARTITION BY l.voter ORDER BY l.pos)
                     AS rank
              FROM links l WHERE l.voter IN (SELECT voter FROM suspects)) r
    )
    UPDATE candidates SET dropped = 'voter_cap'
    WHERE cid IN (
        SELECT r.cid FROM ranked r CROSS JOIN total t
        WHERE r.rank > greatest(%(voter_floor)s,
                                floor(%(voter_share)s / (1 - %(voter_share)s) * (t.n - r.mine)))
    )
"""


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
        SELECT o.prompt_sha256, ratchet_prompt(c.messages) AS prompt FROM (
            SELECT DISTINCT ON (a.prompt_sha256) a.prompt_sha256, a.id
            FROM (SELECT DISTINCT prompt_sha256 FROM kept) k
            JOIN answers a ON a.prompt_sha256 = k.prompt_sha256
            ORDER BY a.prompt_sha256, a.id
        ) o JOIN completions c ON c.id = o.id
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
        JOIN completions ra ON ra.id = k.rejected_id
        LEFT JOIN completions ca ON ca.id = k.chosen_id
        """,
        {**p, "snapshot": snapshot_id},
    )
    conn.execute(
        """
        INSERT INTO pair_sources (snapshot_id, pair_id, completion_id, vote_ids, comparison_id)
        -- thumbs: every vote on either answer (links made distinct: merged duplicates
        -- can share an answer), read here for the few answers kept, by index
        SELECT %(snapshot)s, l.pair_id, l.id,
               (SELECT array_agg(v.id ORDER BY v.id) FROM votes v WHERE v.completion_id = l.id),
               NULL::uuid
        FROM (SELECT pair_id, chosen_id AS id FROM kept WHERE rule = 'thumbs'
              UNION SELECT pair_id, rejected_id FROM kept WHERE rule = 'thumbs') l
        UNION ALL  -- corrections: the vote that carried the correction
        SELECT %(snapshot)s, pair_id, rejected_id, ARRAY[vote_id], NULL
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
    # ratchet_prompt is costly (a jsonb walk per call): once per distinct conversation,
    # not once per row. It depends on the messages alone, so the rows are the same.
    conn.execute(
        f"""
        WITH picked AS (
            SELECT DISTINCT ON (a.id) a.id, a.prompt_sha256, label
            FROM (
                SELECT id, net > 0 AS label, 1 AS source FROM answers
                WHERE net <> 0 AND dropped IS NULL
                UNION ALL
                SELECT unnest(ARRAY[completion_a, completion_b]), false, 2
                FROM comparisons WHERE choice = 'both_bad'
            ) s JOIN answers a ON a.id = s.id
            WHERE a.dropped IS NULL AND NOT EXISTS (SELECT 1 FROM paired WHERE paired.id = a.id)
            ORDER BY a.id, s.source
        ), rows AS MATERIALIZED (
            SELECT p.id, p.prompt_sha256, p.label, c.messages, c.output
            FROM picked p JOIN completions c ON c.id = p.id
        ), conversations AS MATERIALIZED (
            SELECT messages, ratchet_prompt(messages) AS prompt
            FROM (SELECT DISTINCT messages FROM rows) m
        )
        INSERT INTO kto_rows (snapshot_id, completion_id, split, prompt_sha256, prompt,
                              completion, label)
        SELECT %(snapshot)s, r.id, {_split("r.prompt_sha256")}, r.prompt_sha256, m.prompt,
               r.output, r.label
        FROM rows r JOIN conversations m ON m.messages = r.messages
        """,
        {**p, "snapshot": snapshot_id},
    )


RULES = (choice_pairs, correction_pairs, thumbs_pairs)
