"""feedback/: the answer log and what users said about it.

Owns the schema (`migrations/`, applied by `migrate.py`) and the plain-SQL
repositories the gateway writes through: completions, votes and comparisons.
"""
