"""Shared request dependencies, as `Annotated` aliases for route signatures."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from procrastinate import App as JobApp
from psycopg_pool import AsyncConnectionPool

from feedback.log import AnswerLog
from ratchet.db import DatabaseWatch
from ratchet.keys import ApiKey, Role
from ratchet.replicas import EngineSet
from ratchet.settings import Settings
from serve.auth import Authenticator, check_role
from serve.chat import ChatService
from serve.comparisons import ComparisonService
from serve.lifecycle import Housekeeping, Shutdown
from serve.metrics import Metrics
from serve.routing import ModelRouter
from serve.supervisor import EngineSupervisor


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
    metrics: Metrics
    answers: AnswerLog
    chat: ChatService
    comparisons: ComparisonService
    supervisor: EngineSupervisor | None
    base_model_sha256: str | None
    jobs: JobApp
    housekeeping: Housekeeping
    shutdown: Shutdown


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def require(*roles: Role):  # type: ignore[no-untyped-def]
    """A dependency that authenticates the caller and checks its role."""

    async def dependency(
        services: ServicesDep, authorization: Annotated[str | None, Header()] = None
    ) -> ApiKey:
        key = await services.auth.authenticate(authorization)
        check_role(key, roles)
        return key

    return Depends(dependency)


ChatKey = Annotated[ApiKey, require("chat")]
ReviewerKey = Annotated[ApiKey, require("reviewer")]
OpsKey = Annotated[ApiKey, require("ops")]
