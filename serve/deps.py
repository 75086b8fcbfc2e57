"""Shared request dependencies, as `Annotated` aliases for route signatures."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Path, Request, Response
from procrastinate import App as JobApp
from psycopg_pool import AsyncConnectionPool

from feedback.log import AnswerLog
from ratchet.db import DatabaseWatch
from ratchet.keys import ApiKey, Role
from ratchet.replicas import EngineSet
from ratchet.settings import Settings
from serve.auth import Authenticator, check_role, client_address
from serve.chat import ChatService
from serve.comparisons import ComparisonService
from serve.lifecycle import Housekeeping, Shutdown
from serve.metrics import Metrics
from serve.quotas import Quotas, Window, quota_headers
from serve.routing import ModelRouter
from serve.supervisor import EngineSupervisor
from serve.tokens import FeedbackTokens


@dataclass
class Services:
    """Everything the routes use, built once in the app's lifespan."""

    settings: Settings
    conninfo: str
    pool: AsyncConnectionPool
    watch: DatabaseWatch
    # Every engine replica: requests are spread over them, a promotion loads and
    # smoke-tests the adapter on each.
    engines: EngineSet
    router: ModelRouter
    auth: Authenticator
    # Per-key rpm/tpm/concurrency, the in-flight cap, failed-auth throttling.
    quotas: Quotas
    metrics: Metrics
    answers: AnswerLog
    chat: ChatService
    comparisons: ComparisonService
    # Signs and checks the feedback tokens answers carry (votes without the API key).
    tokens: FeedbackTokens
    supervisor: EngineSupervisor | None
    base_model_sha256: str | None
    jobs: JobApp
    housekeeping: Housekeeping
    shutdown: Shutdown


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop
    # on every request for what is one attribute read.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def require(*roles: Role):  # type: ignore[no-untyped-def]
    """A dependency that authenticates the caller, counts the call against the key's
    requests per minute (even one its role may not make) and checks its role."""

    async def dependency(
        request: Request,
        response: Response,
        services: ServicesDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> ApiKey:
        key = await services.auth.authenticate(authorization, client_address(request))
        window = await services.quotas.request(key)
        request.state.requests_window = window
        response.headers.update(quota_headers(window, None))
        check_role(key, roles)
        return key

    return Depends(dependency)


def requests_window(request: Request) -> Window | None:
    """The caller's requests-per-minute window, as `require` counted it."""
    window: Window | None = getattr(request.state, "requests_window", None)
    return window


ChatKey = Annotated[ApiKey, require("chat")]
ReviewerKey = Annotated[ApiKey, require("reviewer")]
OpsKey = Annotated[ApiKey, require("ops")]

# Ids of rows (runs, snapshots, evaluations) in a path: bigint's range, so an id no
# row can have is a 400 before it reaches Postgres (which would fail the query).
RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]
