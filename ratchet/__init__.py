"""Ratchet: serve a chat model, learn from its users, promote only what is shown better.

This package holds the pieces every stage shares: settings, the database (pool,
embedded server, migrations), the adapter registry, content hashes and the CLI.
The stages themselves live in `serve/`, `feedback/`, `trainer/` and `eval/`.
"""

__version__ = "0.1.0"
