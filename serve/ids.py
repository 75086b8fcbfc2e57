"""Public ids: a type prefix and a UUID's hex, e.g. `chatcmpl-…` for answers."""

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class IdFormat:
    prefix: str

    def format(self, uid: uuid.UUID) -> str:
        return self.prefix + uid.hex

    def parse(self, value: str) -> uuid.UUID | None:
        """The UUID behind a public id; None for anything that is not one of ours."""
        try:
            return uuid.UUID(value.removeprefix(self.prefix))
        except ValueError:
            return None


COMPLETION_ID = IdFormat("chatcmpl-")
COMPARISON_ID = IdFormat("cmp-")
