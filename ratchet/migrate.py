"""Versioned schema migrations: `NNNN_name.sql` files applied in order, once each.

Every process may call `migrate()` at start-up: a transaction-level advisory lock
makes concurrent callers wait for each other, and applied versions are skipped.
"""

from dataclasses import dataclass
from importlib import resources

import psycopg

# Arbitrary but fixed: all Ratchet processes must agree on it.
_LOCK_ID = 0x52415443  # "RATC"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


# A migration file holding only this line applies the job library's own schema, so
# that its tables come and go with ours, in the same ordered, locked sequence.
PROCRASTINATE = "-- include: procrastinate schema"


def available() -> list[Migration]:
    """The migrations shipped with this package, in version order."""
    found = []
    for entry in resources.files("ratchet.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version, _, name = entry.name.removesuffix(".sql").partition("_")
            sql = entry.read_text()
            if sql.strip() == PROCRASTINATE:
                from procrastinate.schema import SchemaManager

                sql = SchemaManager.get_schema()
            found.append(Migration(int(version), name, sql))
    return sorted(found, key=lambda m: m.version)


def migrate(conninfo: str) -> list[Migration]:
    """Apply pending migrations in one transaction; return those applied."""
    with psycopg.connect(conninfo) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        applied = []
        for migration in available():
            if migration.version in done:
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied.append(migration)
    return applied
