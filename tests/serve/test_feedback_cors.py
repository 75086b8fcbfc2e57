"""A chat product's page on another origin may post votes with a feedback_token (CORS
on the feedback routes only); no other route answers a cross-origin browser."""

import httpx

from tests.helpers import Gateway

PAGE = "https://chat.example.com"


def preflight(gateway: Gateway, path: str) -> httpx.Response:
    return httpx.options(
        gateway.url + path,
        headers={
            "Origin": PAGE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=30,
    )


def test_the_feedback_routes_allow_a_cross_origin_post(gateway: Gateway) -> None:
    for path in ("/v1/feedback", "/v1/comparisons/cmp-0/choice"):
        answered = preflight(gateway, path)
        assert answered.status_code == 200, answered.text
        assert answered.headers["access-control-allow-origin"] in ("*", PAGE)
        assert "POST" in answered.headers["access-control-allow-methods"]
        assert "access-control-allow-credentials" not in answered.headers
    # The actual post carries the header too, even when it is refused.
    refused = httpx.post(
        gateway.url + "/v1/feedback",
        headers={"Origin": PAGE},
        json={"completion_id": "chatcmpl-0", "rating": "up", "feedback_token": "ft1.x.y"},
        timeout=30,
    )
    assert refused.status_code == 401, refused.text
    assert refused.headers["access-control-allow-origin"] in ("*", PAGE)


def test_other_routes_answer_no_cross_origin_browser(gateway: Gateway) -> None:
    for path in ("/v1/chat/completions", "/v1/admin/adapters", "/reports/login"):
        answered = preflight(gateway, path)
        assert "access-control-allow-origin" not in answered.headers, path
