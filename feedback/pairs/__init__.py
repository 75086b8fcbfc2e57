"""From votes to preference pairs, set-based in SQL.

`rules.py` holds one function per rule; `build.py` runs them in one transaction and
writes a snapshot; `files.py` writes and verifies its parquet files; `export.py`
turns a snapshot into TRL, Axolotl or JSONL data.
"""
