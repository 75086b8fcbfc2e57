"""What counts as "the same prompt": the conversation up to its last user turn (all
of it when it has none).

Each message is reduced to its role and its text (text parts joined, whitespace at
the ends stripped), and the list is hashed as canonical JSON. The database has the
same reduction as the SQL function `ratchet_prompt(jsonb)` (migration 0002); a test
keeps the two in step.
"""

import hashlib
import json
from typing import Any

# Exactly what SQL's btrim strips in ratchet_prompt; str.strip() would take more.
_STRIP = " \t\n\r"


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content.strip(_STRIP)
    if isinstance(content, list):
        parts = (str(p.get("text", "")) for p in content if isinstance(p, dict))
        return "".join(parts).strip(_STRIP)
    return ""


def prompt_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation up to and including its last user turn, as {role, content} text.

    With no user turn at all, the whole conversation (unrelated system-only requests
    must not share one empty prompt)."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    last_user = users[-1] if users else len(messages) - 1
    return [
        {"role": str(m.get("role")), "content": message_text(m.get("content"))}
        for m in messages[: last_user + 1]
    ]


def prompt_sha256(messages: list[dict[str, Any]]) -> str:
    canonical = json.dumps(
        prompt_messages(messages), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
