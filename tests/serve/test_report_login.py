"""Report sessions on a real gateway, in real Chromium: signing in keeps the key out of
the browser, every form needs the session's CSRF token and our own Origin, signing
out (or expiry, idleness, a revoked key) ends the session, and every response carries
the security headers."""

import hashlib
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.responses import Response

from ratchet.report import BenchmarkScore, Decision, DiffSummary, ModelRef, Report
from ratchet.review import MAX_NOTE_CHARS
from ratchet.settings import Settings
from serve import sessions
from tests.browser import CHROMIUM_ARGS, chromium
from tests.helpers import RATCHET, Gateway, auth, make_key, make_lora, query

EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def adapter(
    gateway_env: dict[str, str],
    base_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
) -> Iterator[dict[str, Any]]:
    """A real LoRA, registered by the CLI (which the engine loads and smoke-tests when
    the report is approved); production is the base again afterwards."""
    # A new adapter every run: an engine shared by several runs (RATCHET_TEST_ENGINE_URL)
    # must never be asked for an adapter of the same name whose files were another run's.
    seed = secrets.randbelow(2**31)
    path = make_lora(base_model_dir, tmp_path_factory.mktemp("report-login"), seed=seed)
    done = subprocess.run(
        [RATCHET, "adapters", "register", str(path)],
        env={**os.environ, **gateway_env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    sha = done.stdout.split("sha256=")[1].strip()
    yield query(database_url, "SELECT * FROM adapters WHERE sha256 = %s", sha)[0]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE adapters SET status = 'retired' WHERE status <> 'retired'")
        conn.execute("INSERT INTO promotions (to_adapter_id, actor) VALUES (NULL, 'cleanup')")
    time.sleep(Settings().registry_cache_seconds + 0.2)


@pytest.fixture(scope="module")
def evaluation_id(adapter: dict[str, Any], database_url: str) -> int:
    """A finished, passed evaluation of the adapter against the production of now, with
    its report (the gate itself is tested in tests/eval; here only the page matters)."""
    row = query(
        database_url,
        "INSERT INTO evaluations (adapter_id, status, decision, reasons, finished_at,"
        " production_id, requested_by) VALUES (%s, 'succeeded', 'pass', '[\"constructed\"]',"
        " now(), (SELECT to_adapter_id FROM promotions ORDER BY id DESC LIMIT 1), 'test')"
        " RETURNING id",
        adapter["id"],
    )[0]
    report = Report(
        evaluation_id=row["id"],
        created_at=datetime.now(UTC),
        candidate=ModelRef(label=adapter["engine_name"], sha256=adapter["sha256"]),
        production=ModelRef(label="base"),
        base_model="SmolLM2-135M-Instruct",
        mode="review",
        policy={},
        decision=Decision(decision="pass", reasons=["constructed"], criteria=[]),
        benchmarks=[
            BenchmarkScore(
                task="arc",
                n=50,
                production=0.4,
                candidate=0.5,
                delta=0.1,
                ci_low=0.02,
                ci_high=0.18,
                production_ci=(0.3, 0.5),
                candidate_ci=(0.4, 0.6),
                p_value=0.04,
                changed=7,
            )
        ],  # fmt: skip
        preference=None,
        diff_summary=DiffSummary(n=0, identical=1.0, mean_length_ratio=1.0, flags={}),
        diffs=[],
    )
    query(
        database_url,
        "UPDATE evaluations SET report = %s WHERE id = %s RETURNING id",
        report.model_dump_json(),
        row["id"],
    )
    return int(row["id"])


def cookie_header(session_id: str) -> dict[str, str]:
    return {"Cookie": f"{sessions.COOKIE}={session_id}"}


def sign_in(gateway: Gateway, secret: str, evaluation_id: int) -> str:
    """Sign in as a browser would (form post, own Origin); the session cookie's value."""
    response = httpx.post(
        gateway.url + "/reports/login",
        data={"key": secret, "next": f"/reports/{evaluation_id}"},
        headers={"Origin": gateway.url},
        timeout=30,
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == f"/reports/{evaluation_id}"
    return response.cookies[sessions.COOKIE]


def page(gateway: Gateway, evaluation_id: int, session_id: str) -> httpx.Response:
    return httpx.get(
        f"{gateway.url}/reports/{evaluation_id}", headers=cookie_header(session_id), timeout=30
    )


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def post_form(
    gateway: Gateway, path: str, session_id: str, origin: str | None, **fields: str
) -> httpx.Response:
    headers = cookie_header(session_id) | ({"Origin": origin} if origin else {})
    return httpx.post(gateway.url + path, data=fields, headers=headers, timeout=120)


@contextmanager
def other_origin_page(action: str, csrf: str) -> Iterator[str]:
    """A page served from another origin (another port) whose form posts to `action`."""
    html = (
        f'<!doctype html><form method="post" action="{action}">'
        f'<input type="hidden" name="csrf" value="{csrf}">'
        '<input type="hidden" name="note" value="forged from another site">'
        '<button id="forged">Win a prize</button></form>'
    ).encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/prize"
    finally:
        server.shutdown()
        server.server_close()


def review_state(database_url: str, evaluation_id: int) -> dict[str, Any]:
    """What a refused form must leave unchanged."""
    return query(
        database_url,
        "SELECT e.review, e.review_note, (SELECT count(*) FROM audit) AS audit,"
        " (SELECT count(*) FROM promotions) AS promotions FROM evaluations e WHERE e.id = %s",
        evaluation_id,
    )[0]


def session_row(database_url: str, session_id: str) -> dict[str, Any]:
    digest = hashlib.sha256(session_id.encode()).hexdigest()
    rows = query(database_url, "SELECT * FROM report_sessions WHERE id_sha256 = %s", digest)
    assert len(rows) == 1
    return rows[0]


def test_sign_in_approve_and_sign_out_in_chromium(
    gateway: Gateway, evaluation_id: int, database_url: str
) -> None:
    from playwright.sync_api import sync_playwright

    key_id, secret = make_key(database_url, "reviewer", "browser reviewer")
    target = f"/reports/{evaluation_id}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        context = browser.new_context()
        tab = context.new_page()
        console: list[str] = []
        tab.on("console", lambda message: console.append(message.text))
        tab.on("pageerror", lambda error: console.append(str(error)))
        first = tab.goto(gateway.url + target)
        assert first is not None and first.status == 401
        tab.fill("#key", secret)
        tab.click("#sign-in")
        tab.wait_for_selector("#decision")
        assert tab.inner_text("#decision") == "PASS"

        # The cookie holds a random session id, never the key; the database only its hash.
        cookies = context.cookies()
        assert [c["name"] for c in cookies] == [sessions.COOKIE]
        cookie = cookies[0]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/reports" and not cookie["secure"]
        session_id = cookie["value"]
        assert secret not in session_id and len(session_id) >= 40
        row = session_row(database_url, session_id)
        assert str(row["key_id"]) == key_id and row["ended_at"] is None
        assert session_id not in json.dumps(row, default=str)
        # Every form carries the session's CSRF token.
        assert tab.locator("input[name=csrf]").count() == 2  # the review form, Sign out
        csrf = tab.locator("#review-form input[name=csrf]").input_value()
        assert csrf == row["csrf_token"]
        # The page's styles apply under its CSP (the nonce), and nothing was blocked.
        assert tab.locator("header").evaluate("e => getComputedStyle(e).backgroundColor") == (
            "rgb(246, 248, 250)"
        )
        assert tab.locator("#chart svg rect.bar.candidate").count() == 1
        assert tab.locator("#review-form input[name=note]").get_attribute("maxlength") == str(
            MAX_NOTE_CHARS
        )

        # Forged posts with the live session's cookie change nothing.
        before = review_state(database_url, evaluation_id)
        approve = f"{target}/approve"
        evil = post_form(gateway, approve, session_id, EVIL, csrf=csrf, note="forged")
        assert evil.status_code == 403 and "not from this site" in evil.text
        assert EVIL in evil.text and evil.headers["content-type"].startswith("text/html")
        no_token = post_form(gateway, approve, session_id, gateway.url, note="no token")
        assert no_token.status_code == 403 and "security token" in no_token.text
        wrong = post_form(gateway, approve, session_id, gateway.url, csrf=csrf[:-2] + "xx")
        assert wrong.status_code == 403 and "security token" in wrong.text
        no_origin = post_form(gateway, approve, session_id, None, csrf=csrf)
        assert no_origin.status_code == 403 and "no origin at all" in no_origin.text
        long_note = "n" * (MAX_NOTE_CHARS + 1)
        too_long = post_form(gateway, approve, session_id, gateway.url, csrf=csrf, note=long_note)
        assert too_long.status_code == 400 and "Note too long" in too_long.text
        assert review_state(database_url, evaluation_id) == before

        # The same from a page of another origin, in the browser: its form carries the
        # live session's cookie (same site) and even a stolen CSRF token, and is refused.
        with other_origin_page(gateway.url + approve, csrf) as evil_url:
            tab.goto(evil_url)
            with tab.expect_navigation():
                tab.click("#forged")
            assert "not from this site" in tab.content()
            assert evil_url.rsplit("/", 1)[0] in tab.content()  # it names the sender
        assert review_state(database_url, evaluation_id) == before
        tab.goto(gateway.url + target)

        # The real form: approve (the engine loads and smoke-tests the adapter).
        tab.fill("#review-form input[name=note]", "reviewed in a browser")
        tab.click("#approve")
        tab.wait_for_selector("#notice", timeout=300_000)
        assert "Approved" in tab.inner_text("#notice")
        assert tab.inner_text("#review-status") == "approved"

        tab.click("#sign-out")
        tab.wait_for_selector("#sign-in")
        assert tab.title().startswith("Signed out")
        assert context.cookies() == []
        assert not any("Content Security Policy" in text for text in console), console
        browser.close()

    decided = query(database_url, "SELECT * FROM evaluations WHERE id = %s", evaluation_id)[0]
    assert decided["review"] == "approved" and "browser reviewer" in decided["reviewed_by"]
    assert decided["review_note"] == "reviewed in a browser"
    assert session_row(database_url, session_id)["ended_at"] is not None
    # The old cookie signs nobody in any more.
    stale = page(gateway, evaluation_id, session_id)
    assert stale.status_code == 401 and 'id="sign-in"' in stale.text
    assert "session has ended" in stale.text and 'id="decision"' not in stale.text


def test_sign_in_refuses_other_origins_and_wrong_keys(
    gateway: Gateway, evaluation_id: int, database_url: str, chat_key: tuple[str, str]
) -> None:
    _, secret = make_key(database_url, "reviewer", "origin check")
    sessions_before = query(database_url, "SELECT count(*) AS n FROM report_sessions")[0]["n"]
    form = {"key": secret, "next": f"/reports/{evaluation_id}"}

    def login(headers: dict[str, str], data: dict[str, str] = form) -> httpx.Response:
        return httpx.post(gateway.url + "/reports/login", data=data, headers=headers, timeout=30)

    evil = login({"Origin": EVIL})
    assert evil.status_code == 403 and sessions.COOKIE not in evil.cookies
    assert login({"Referer": EVIL + "/page"}).status_code == 403
    assert login({"Origin": "null"}).status_code == 403
    assert login({}).status_code == 403  # a browser's form always names where it came from
    wrong = login({"Origin": gateway.url}, {**form, "key": "rk_wrong"})
    assert wrong.status_code == 401 and 'id="sign-in"' in wrong.text
    chat = login({"Origin": gateway.url}, {**form, "key": chat_key[1]})
    assert chat.status_code == 403 and "Not allowed" in chat.text
    after = query(database_url, "SELECT count(*) AS n FROM report_sessions")[0]["n"]
    assert after == sessions_before
    # Referer stands in for a missing Origin; an open redirect is never offered.
    ok = login({"Referer": gateway.url + f"/reports/{evaluation_id}"}, {**form, "next": "//x.y"})
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    set_cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    assert "path=/reports" in set_cookie and "secure" not in set_cookie


def test_sessions_end_at_expiry_idleness_revocation_and_logout(
    gateway: Gateway, evaluation_id: int, database_url: str
) -> None:
    key_id, secret = make_key(database_url, "reviewer", "session ends")

    def ended(session_id: str) -> bool:
        response = page(gateway, evaluation_id, session_id)
        assert response.status_code in (200, 401), response.text
        return response.status_code == 401 and 'id="sign-in"' in response.text

    expired = sign_in(gateway, secret, evaluation_id)
    assert not ended(expired)
    query(
        database_url,
        "UPDATE report_sessions SET expires_at = now() - interval '1 second'"
        " WHERE id_sha256 = %s RETURNING id_sha256",
        session_row(database_url, expired)["id_sha256"],
    )
    assert ended(expired)

    idle = sign_in(gateway, secret, evaluation_id)
    digest = session_row(database_url, idle)["id_sha256"]

    def used_ago(seconds: float) -> None:
        query(
            database_url,
            "UPDATE report_sessions SET last_used_at = now() - make_interval(secs => %s)"
            " WHERE id_sha256 = %s RETURNING id_sha256",
            seconds,
            digest,
        )

    # Use is recorded at most once a minute: no write per page view.
    used_ago(30)
    before = session_row(database_url, idle)["last_used_at"]
    assert not ended(idle)
    assert session_row(database_url, idle)["last_used_at"] == before
    used_ago(120)
    assert not ended(idle)
    assert session_row(database_url, idle)["last_used_at"] > before
    used_ago(Settings().session_idle_s + 1)
    assert ended(idle)

    revoked = sign_in(gateway, secret, evaluation_id)
    assert not ended(revoked)
    query(database_url, "UPDATE api_keys SET revoked_at = now() WHERE id = %s RETURNING id", key_id)
    assert ended(revoked)

    # Logout is a form too: without the token it is refused and the session lives on.
    _, other = make_key(database_url, "reviewer", "logout")
    session_id = sign_in(gateway, other, evaluation_id)
    csrf = csrf_of(page(gateway, evaluation_id, session_id).text)
    refused = post_form(gateway, "/reports/logout", session_id, gateway.url)
    assert refused.status_code == 403 and not ended(session_id)
    cross = post_form(gateway, "/reports/logout", session_id, EVIL, csrf=csrf)
    assert cross.status_code == 403 and not ended(session_id)
    out = post_form(gateway, "/reports/logout", session_id, gateway.url, csrf=csrf)
    assert out.status_code == 200 and "Signed out" in out.text
    assert f'{sessions.COOKIE}=""' in out.headers["set-cookie"]
    assert ended(session_id)


def test_bearer_clients_need_no_cookie_or_token(
    gateway: Gateway, evaluation_id: int, database_url: str, reviewer_key: tuple[str, str]
) -> None:
    report = httpx.get(
        f"{gateway.url}/reports/{evaluation_id}?format=json", headers=auth(reviewer_key[1])
    )
    assert report.status_code == 200 and report.json()["evaluation_id"] == evaluation_id
    assert "set-cookie" not in report.headers
    huge = httpx.get(f"{gateway.url}/reports/{2**64}", headers=auth(reviewer_key[1]))
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "path.evaluation_id"
    before = review_state(database_url, evaluation_id)
    path = f"{gateway.url}/reports/{evaluation_id}/reject"
    # No Origin, no cookie, no token: the request reaches the note's cap (the API's).
    long_note = {"note": "n" * (MAX_NOTE_CHARS + 1)}
    capped = httpx.post(path, data=long_note, headers=auth(reviewer_key[1]))
    assert capped.status_code == 400 and "Note too long" in capped.text
    # A browser page elsewhere holding a key still cannot post from its own origin.
    foreign = httpx.post(path, data={}, headers=auth(reviewer_key[1]) | {"Origin": EVIL})
    assert foreign.status_code == 403
    assert review_state(database_url, evaluation_id) == before


def test_security_headers_on_every_response(
    gateway: Gateway, evaluation_id: int, chat_key: tuple[str, str]
) -> None:
    responses = [
        httpx.get(gateway.url + "/v1/models", headers=auth(chat_key[1])),
        httpx.get(gateway.url + "/v1/models"),  # a 401 error body
        httpx.get(f"{gateway.url}/reports/{evaluation_id}"),  # the sign-in page
        httpx.get(f"{gateway.url}/reports/{evaluation_id}"),
    ]
    assert [r.status_code for r in responses] == [200, 401, 401, 401]
    for response in responses:
        headers = response.headers
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "script-src" not in csp and "unsafe-inline" not in csp
    assert "cache-control" not in responses[0].headers
    nonces = []
    for sign_in_page in responses[2:]:
        assert sign_in_page.headers["cache-control"] == "no-store"
        nonce = re.search(r"'nonce-([^']+)'", sign_in_page.headers["content-security-policy"])
        assert nonce and f'<style nonce="{nonce.group(1)}">' in sign_in_page.text
        nonces.append(nonce.group(1))
    assert nonces[0] != nonces[1]  # fresh for every response


def test_the_cookie_is_secure_when_configured() -> None:
    response = Response()
    sessions.set_cookie(response, "sid", Settings(session_cookie_secure=True))
    cookie = response.headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    plain = Response()
    sessions.set_cookie(plain, "sid", Settings())
    assert "secure" not in plain.headers.getlist("set-cookie")[0].lower()
