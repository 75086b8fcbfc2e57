"""Errors shared by every stage.

RatchetError
 ├── ConfigError        settings that cannot work (missing model, bad path)
 ├── DatabaseError      the database could not be reached or migrated
 ├── ModelError         the base model could not be prepared or hashed
 ├── Busy               one-at-a-time work (a training, an adapter's evaluation) is
 │                      already queued or running
 └── EngineError        a call to a vLLM engine failed (see ratchet.engine)
"""


class RatchetError(Exception):
    """Base of every error Ratchet raises on purpose."""


class ConfigError(RatchetError):
    """The effective settings cannot work; the message says which one and why."""


class DatabaseError(RatchetError):
    """The database could not be started, reached or migrated."""


class ModelError(RatchetError):
    """The base model could not be prepared, found or hashed."""


class Busy(RatchetError):
    """Work that runs one at a time is already queued or running."""
