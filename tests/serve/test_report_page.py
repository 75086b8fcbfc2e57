"""The report page as rendered: a report made against an older production says so and
offers a new evaluation instead of an Approve button; every form carries the session's
CSRF token; nothing inline needs more than the CSP's nonce."""

import re
from datetime import UTC, datetime

from ratchet.report import Decision, DiffSummary, ModelRef, Report
from ratchet.review import MAX_NOTE_CHARS
from serve import render


def report() -> Report:
    return Report(
        evaluation_id=7,
        created_at=datetime.now(UTC),
        candidate=ModelRef(label="ratchet-cand"),
        production=ModelRef(label="base"),
        base_model="SmolLM2-135M-Instruct",
        mode="review",
        policy={},
        decision=Decision(decision="pass", reasons=["preference"], criteria=[]),
        benchmarks=[],
        preference=None,
        diff_summary=DiffSummary(n=0, identical=1.0, mean_length_ratio=1.0, flags={}),
        diffs=[],
    )


def test_a_current_report_can_be_approved() -> None:
    page = render.html(report(), can_review=True)
    assert 'id="approve"' in page and 'id="stale"' not in page


def test_a_stale_report_offers_a_new_evaluation_instead() -> None:
    page = render.html(report(), can_review=True, stale="ratchet-newprod")
    assert 'id="approve"' not in page
    assert 'action="/reports/7/reevaluate"' in page
    assert "production is now <code>ratchet-newprod</code>" in page


def test_a_decided_report_is_not_called_stale() -> None:
    decided = report()
    decided.review.status = "approved"
    page = render.html(decided, can_review=True, stale="ratchet-newprod")
    assert 'id="stale"' not in page


def test_every_form_carries_the_csrf_token_and_the_page_needs_no_inline_style() -> None:
    current = render.html(report(), can_review=True, csrf="tok123", nonce="n0nce")
    stale = render.html(report(), can_review=True, stale="ratchet-newprod", csrf="tok123")
    for page in (current, stale):
        forms = re.findall(r"<form\b.*?</form>", page, flags=re.S)
        assert len(forms) == 2  # a decision (or evaluate again), and Sign out
        assert all('<input type="hidden" name="csrf" value="tok123">' in f for f in forms)
        assert " style=" not in page  # the CSP allows only the nonced <style> block
    assert '<style nonce="n0nce">' in current and 'id="sign-out"' in current
    assert f'maxlength="{MAX_NOTE_CHARS}"' in current


def test_without_a_session_there_is_no_sign_out() -> None:
    page = render.html(report(), can_review=True)
    assert 'id="sign-out"' not in page and 'name="csrf"' not in page
