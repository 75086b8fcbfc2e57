"""The job queue as the gateway sees it: a procrastinate app with no tasks of its own,
deferring by name on the gateway's pool (the worker holds the task code)."""

from procrastinate import App, PsycopgConnector

QUEUE = "training"
TRAIN_TASK = "ratchet:train"


def deferring_app() -> App:
    return App(connector=PsycopgConnector())
