"""The job queue as the gateway sees it: a procrastinate app with no tasks of its own,
deferring by name on the gateway's pool (the worker holds the task code)."""

from procrastinate import App, PsycopgConnector, SyncPsycopgConnector

QUEUE = "training"
TRAIN_TASK = "ratchet:train"
EVALUATE_TASK = "ratchet:evaluate"


def deferring_app() -> App:
    return App(connector=PsycopgConnector())


def defer_evaluation(conninfo: str, adapter_id: str) -> int:
    """Queue the evaluation of a new candidate, from synchronous code (a training)."""
    app = App(connector=SyncPsycopgConnector(conninfo=conninfo))
    with app.open():
        job_id: int = app.configure_task(EVALUATE_TASK, queue=QUEUE).defer(adapter_id=adapter_id)
    return job_id
