"""Promotion reports as web pages for reviewers: `/reports/{id}`.

Browsers cannot send a Bearer header on a plain navigation, so a reviewer signs in
once with their key, which is kept in an HttpOnly, SameSite=Strict cookie (the
SameSite rule is what keeps other sites from posting Approve on their behalf).
"""

from typing import Annotated, Literal
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Cookie, Header, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment

from ratchet import evaluations, registry
from ratchet.keys import ApiKey
from serve import render
from serve.auth import check_role
from serve.deps import ServicesDep
from serve.errors import APIError, Forbidden, Unauthorized
from serve.routes.gate import actor, decide, queue_evaluation

router = APIRouter(tags=["reports"])
COOKIE = "ratchet_key"


@router.get("/reports/{evaluation_id}", response_class=HTMLResponse, response_model=None)
async def report_page(
    evaluation_id: int,
    services: ServicesDep,
    format: Literal["html", "md", "json"] = "html",
    done: str | None = None,
    authorization: Annotated[str | None, Header()] = None,
    ratchet_key: Annotated[str | None, Cookie()] = None,
) -> Response:
    key = await _reviewer(services, authorization, ratchet_key, f"/reports/{evaluation_id}")
    if isinstance(key, Response):
        return key
    async with services.pool.connection() as conn:
        evaluation = await evaluations.get(conn, evaluation_id)
        production = await registry.production(conn)
    if evaluation is None:
        return _page("Report not found", f"There is no evaluation {evaluation_id}.", 404)
    report = evaluations.report_of(evaluation)
    if report is None:
        message = (
            f"Evaluation {evaluation_id} is {evaluation.status}"
            + (f" ({evaluation.stage}, {evaluation.progress:.0%})" if evaluation.stage else "")
            + (f": {evaluation.error}" if evaluation.error else "; reload this page later.")
        )
        return _page("Report not ready", message, 200 if evaluation.status != "failed" else 409)
    if format != "html":
        media = "application/json" if format == "json" else "text/markdown; charset=utf-8"
        return Response(render.render(report, format), media_type=media)
    notice = {
        "approved": "Approved: the adapter is production now.",
        "rejected": "Rejected: the adapter will not be promoted.",
    }.get(done or "")
    stale = None
    if evaluation.production_id != (production.id if production else None):
        stale = production.engine_name if production else "base"
    return HTMLResponse(render.html(report, can_review=True, notice=notice, stale=stale))


@router.post("/reports/{evaluation_id}/reevaluate", response_model=None)
async def reevaluate_form(
    evaluation_id: int,
    services: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
    ratchet_key: Annotated[str | None, Cookie()] = None,
) -> Response:
    """A report made against an older production: queue the same adapter's evaluation
    against production as it is now, and go to the new report."""
    key = await _reviewer(services, authorization, ratchet_key, f"/reports/{evaluation_id}")
    if isinstance(key, Response):
        return key
    async with services.pool.connection() as conn:
        evaluation = await evaluations.get(conn, evaluation_id)
        adapter = await registry.get_by_id(conn, evaluation.adapter_id) if evaluation else None
    if adapter is None:
        return _page("Report not found", f"There is no evaluation {evaluation_id}.", 404)
    try:
        queued = await queue_evaluation(services, adapter, actor(key))
    except APIError as exc:
        return _page("Not done", exc.message, exc.status_code, back=f"/reports/{evaluation_id}")
    return RedirectResponse(f"/reports/{queued.id}", status_code=303)


@router.post("/reports/{evaluation_id}/{verdict}", response_model=None)
async def review_form(
    evaluation_id: int,
    verdict: Literal["approve", "reject"],
    request: Request,
    services: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
    ratchet_key: Annotated[str | None, Cookie()] = None,
) -> Response:
    key = await _reviewer(services, authorization, ratchet_key, f"/reports/{evaluation_id}")
    if isinstance(key, Response):
        return key
    form = parse_qs((await request.body()).decode(errors="replace"))
    note = (form.get("note") or [""])[0].strip() or None
    try:
        await decide(
            services, evaluation_id, key, "approved" if verdict == "approve" else "rejected", note
        )
    except APIError as exc:
        return _page("Not done", exc.message, exc.status_code, back=f"/reports/{evaluation_id}")
    done = "approved" if verdict == "approve" else "rejected"
    return RedirectResponse(f"/reports/{evaluation_id}?done={done}", status_code=303)


@router.post("/reports/login", response_model=None)
async def login(request: Request, services: ServicesDep) -> Response:
    form = parse_qs((await request.body()).decode(errors="replace"))
    secret = (form.get("key") or [""])[0].strip()
    target = (form.get("next") or ["/"])[0]
    if not target.startswith("/reports/"):  # never an open redirect
        target = "/"
    checked = await _reviewer(services, f"Bearer {secret}", None, target)
    if isinstance(checked, Response):
        return checked
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, secret, httponly=True, samesite="strict", path="/reports")
    return response


async def _reviewer(
    services: ServicesDep, authorization: str | None, cookie: str | None, target: str
) -> ApiKey | Response:
    """The signed-in reviewer (or ops) key, or the page to answer with instead."""
    header = authorization or (f"Bearer {cookie}" if cookie else None)
    try:
        key = await services.auth.authenticate(header)
        check_role(key, ("reviewer",))
    except Unauthorized as exc:
        message = None if header is None else exc.message
        return _page("Sign in to review", message, 401, login=True, next=target)
    except Forbidden as exc:
        return _page("Not allowed", exc.message, 403)
    return key


def _page(
    title: str,
    message: str | None,
    status: int,
    login: bool = False,
    next: str = "",
    back: str | None = None,
) -> HTMLResponse:
    template = Environment(autoescape=True).from_string(
        render._load("login.html") or "{{ message }}"
    )
    body = template.render(title=title, message=message, login=login, next=next)
    if back:
        body = body.replace(
            "</body>", f'<p><a href="{quote(back)}">Back to the report</a></p></body>'
        )
    return HTMLResponse(body, status_code=status)
