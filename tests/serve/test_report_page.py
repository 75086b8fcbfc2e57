"""A report made against an older production says so, and offers a new evaluation
instead of an Approve button."""

from datetime import UTC, datetime

from ratchet.report import Decision, DiffSummary, ModelRef, Report
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
