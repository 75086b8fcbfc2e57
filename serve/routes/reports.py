"""Promotion reports as web pages for reviewers: `/reports/{id}`.

Browsers cannot send a Bearer header on a plain navigation, so a reviewer signs in
once with their key and gets a server-side session (serve/sessions.py): the cookie
holds a random id, never the key. Every form posts the session's CSRF token and must
come from our own origin. API clients (`ratchet report`) send a Bearer header instead,
use no cookie, and so need neither check.
"""

from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Cookie, Header, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment

from ratchet import evaluations, registry
from ratchet.keys import ApiKey
from ratchet.review import MAX_NOTE_CHARS
from ratchet.sessions import Session
from serve import render, sessions
from serve.auth import check_role, client_address
from serve.deps import RowId, Services, ServicesDep
from serve.errors import APIError, Forbidden, InvalidRequest, TooManyRequests, Unauthorized
from serve.routes.gate import actor, decide, queue_evaluation

router = APIRouter(tags=["reports"])
SessionCookie = Annotated[str | None, Cookie(alias=sessions.COOKIE)]
Authorization = Annotated[str | None, Header()]
# A bigint in the database: a larger id is a 400, not a failed query.
EvaluationId = RowId


@dataclass
class Reviewer:
    key: ApiKey
    session: Session | None  # None: a Bearer client, which needs no CSRF token


@router.get("/reports/{evaluation_id}", response_class=HTMLResponse, response_model=None)
async def report_page(
    evaluation_id: EvaluationId,
    request: Request,
    services: ServicesDep,
    format: Literal["html", "md", "json"] = "html",
    done: str | None = None,
    authorization: Authorization = None,
    session_id: SessionCookie = None,
) -> Response:
    target = f"/reports/{evaluation_id}"
    reviewer = await _reviewer(services, request, authorization, session_id, target)
    if isinstance(reviewer, Response):
        return reviewer
    async with services.pool.connection() as conn:
        evaluation = await evaluations.get(conn, evaluation_id)
        production = await registry.production(conn)
    if evaluation is None:
        return _page(request, "Report not found", f"There is no evaluation {evaluation_id}.", 404)
    report = evaluations.report_of(evaluation)
    if report is None:
        message = (
            f"Evaluation {evaluation_id} is {evaluation.status}"
            + (f" ({evaluation.stage}, {evaluation.progress:.0%})" if evaluation.stage else "")
            + (f": {evaluation.error}" if evaluation.error else "; reload this page later.")
        )
        status = 200 if evaluation.status != "failed" else 409
        return _page(request, "Report not ready", message, status)
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
    page = render.html(
        report,
        can_review=True,
        notice=notice,
        stale=stale,
        csrf=reviewer.session.csrf_token if reviewer.session else None,
        nonce=_nonce(request),
    )
    return HTMLResponse(page)


@router.post("/reports/login", response_model=None)
async def login(request: Request, services: ServicesDep) -> Response:
    """Sign in with a reviewer (or ops) key: a new session, in a cookie."""
    form = await _form(request)
    target = form.get("next", "/")
    if not target.startswith("/reports/"):  # never an open redirect
        target = "/"
    if not sessions.origin_ok(request, services.settings, required=True):
        return _cross_origin(request)
    secret = form.get("key", "").strip()
    if not secret:
        return _page(request, "Sign in to review", "Enter your API key.", 401, True, target)
    checked = await _reviewer(services, request, f"Bearer {secret}", None, target)
    if isinstance(checked, Response):
        return checked
    session_id, _ = await sessions.start(services, checked.key.id)
    response = RedirectResponse(target, status_code=303)
    sessions.set_cookie(response, session_id, services.settings)
    return response


@router.post("/reports/logout", response_model=None)
async def logout(
    request: Request, services: ServicesDep, session_id: SessionCookie = None
) -> Response:
    """End the session (its cookie no longer signs anyone in) and clear the cookie."""
    form = await _form(request)
    if not sessions.origin_ok(request, services.settings, required=True):
        return _cross_origin(request)
    session = await sessions.current(services, session_id)
    if session is not None:
        if not sessions.csrf_ok(session, form.get("csrf")):
            return _bad_csrf(request)
        assert session_id is not None
        await sessions.end(services, session_id)
    target = form.get("next", "")
    response = _page(
        request,
        "Signed out",
        "You have signed out.",
        200,
        login=True,
        next=target if target.startswith("/reports/") else "/",
    )
    sessions.clear_cookie(response, services.settings)
    return response


@router.post("/reports/{evaluation_id}/reevaluate", response_model=None)
async def reevaluate_form(
    evaluation_id: EvaluationId,
    request: Request,
    services: ServicesDep,
    authorization: Authorization = None,
    session_id: SessionCookie = None,
) -> Response:
    """A report made against an older production: queue the same adapter's evaluation
    against production as it is now, and go to the new report."""
    target = f"/reports/{evaluation_id}"
    checked = await _form_reviewer(services, request, authorization, session_id, target)
    if isinstance(checked, Response):
        return checked
    reviewer, _ = checked
    async with services.pool.connection() as conn:
        evaluation = await evaluations.get(conn, evaluation_id)
        adapter = await registry.get_by_id(conn, evaluation.adapter_id) if evaluation else None
    if adapter is None:
        return _page(request, "Report not found", f"There is no evaluation {evaluation_id}.", 404)
    try:
        queued = await queue_evaluation(services, adapter, actor(reviewer.key))
    except APIError as exc:
        return _page(request, "Not done", exc.message, exc.status_code, back=target)
    return RedirectResponse(f"/reports/{queued.id}", status_code=303)


@router.post("/reports/{evaluation_id}/{verdict}", response_model=None)
async def review_form(
    evaluation_id: EvaluationId,
    verdict: Literal["approve", "reject"],
    request: Request,
    services: ServicesDep,
    authorization: Authorization = None,
    session_id: SessionCookie = None,
) -> Response:
    target = f"/reports/{evaluation_id}"
    checked = await _form_reviewer(services, request, authorization, session_id, target)
    if isinstance(checked, Response):
        return checked
    reviewer, form = checked
    note = form.get("note", "").strip()
    if len(note) > MAX_NOTE_CHARS:  # the API's cap (ReviewRequest.note), refused the same
        message = f"The note has {len(note)} characters; at most {MAX_NOTE_CHARS} are allowed."
        return _page(request, "Note too long", message, 400, back=target)
    decision = "approved" if verdict == "approve" else "rejected"
    try:
        await decide(services, evaluation_id, reviewer.key, decision, note or None)
    except APIError as exc:
        return _page(request, "Not done", exc.message, exc.status_code, back=target)
    return RedirectResponse(f"{target}?done={decision}", status_code=303)


async def _reviewer(
    services: Services,
    request: Request,
    authorization: str | None,
    session_id: str | None,
    target: str,
) -> Reviewer | Response:
    """The reviewer (or ops) key behind a Bearer header or a live session, or the page to
    answer with instead."""
    session = None
    try:
        if authorization is not None:
            key = await services.auth.authenticate(authorization, client_address(request))
        elif (session := await sessions.current(services, session_id)) is not None:
            key = session.key
        else:
            message = "Your session has ended; sign in again." if session_id else None
            response = _page(request, "Sign in to review", message, 401, True, target)
            if session_id:
                sessions.clear_cookie(response, services.settings)
            return response
        check_role(key, ("reviewer",))
    except Unauthorized as exc:
        return _page(request, "Sign in to review", exc.message, 401, True, target)
    except Forbidden as exc:
        return _page(request, "Not allowed", exc.message, 403)
    except TooManyRequests as exc:  # guessing keys at the sign-in form: throttled per address
        response = _page(request, "Too many attempts", exc.message, 429)
        response.headers.update(exc.headers())
        return response
    return Reviewer(key, session)


async def _form_reviewer(
    services: Services,
    request: Request,
    authorization: str | None,
    session_id: str | None,
    target: str,
) -> tuple[Reviewer, dict[str, str]] | Response:
    """A form's POST: from our own origin, by a reviewer, with the session's CSRF token
    (a Bearer client sends no cookie and needs no token, but a foreign Origin is refused
    all the same)."""
    form = await _form(request)
    if not sessions.origin_ok(request, services.settings, required=authorization is None):
        return _cross_origin(request)
    reviewer = await _reviewer(services, request, authorization, session_id, target)
    if isinstance(reviewer, Response):
        return reviewer
    if reviewer.session is not None and not sessions.csrf_ok(reviewer.session, form.get("csrf")):
        return _bad_csrf(request)
    return reviewer, form


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields, first value of each."""
    fields = parse_qs((await request.body()).decode(errors="replace"))
    for name, values in fields.items():
        if "\x00" in name or any("\x00" in v for v in values):
            # No browser sends one; Postgres cannot store one. Refused before any work.
            raise InvalidRequest(
                f"{name}: text must not contain NUL (\\u0000) characters",
                param=name,
                code="invalid_value",
            )
    return {name: values[0] for name, values in fields.items()}


def _cross_origin(request: Request) -> HTMLResponse:
    origin = sessions.sender(request) or "no origin at all"
    message = (
        f"This form was posted from {origin}, not from this site, so it was refused. "
        "Open the report here and use its buttons."
    )
    return _page(request, "Refused: not from this site", message, 403)


def _bad_csrf(request: Request) -> HTMLResponse:
    message = (
        "This form did not carry this session's security token (it came from an old page "
        "or from somewhere else), so it was refused. Reload the report and try again."
    )
    return _page(request, "Refused: form token missing or wrong", message, 403)


def _nonce(request: Request) -> str:
    # Set by serve.middleware.SecurityHeaders, which also sends it in the CSP.
    return str(getattr(request.state, "csp_nonce", ""))


def _page(
    request: Request,
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
    body = template.render(
        title=title, message=message, login=login, next=next, nonce=_nonce(request)
    )
    if back:
        body = body.replace(
            "</body>", f'<p><a href="{quote(back)}">Back to the report</a></p></body>'
        )
    return HTMLResponse(body, status_code=status)
