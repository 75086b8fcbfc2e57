"""A report as a person reads it: an HTML page (with inline SVG charts, no scripts or
outside assets, no style attributes: its one <style> block carries the CSP nonce),
Markdown for tickets and chat, or JSON for machines."""

from html import escape
from importlib import resources
from typing import Any, Literal

from jinja2 import Environment, FunctionLoader, select_autoescape
from markupsafe import Markup

from ratchet.report import BenchmarkScore, Criterion, DiffItem, Report
from ratchet.review import MAX_NOTE_CHARS

Format = Literal["html", "md", "json"]
# The page shows every changed answer first, then unchanged ones, up to this many.
MAX_DIFFS = 60


def render(report: Report, fmt: Format, **page: Any) -> str:
    if fmt == "json":
        return report.model_dump_json(indent=2)
    if fmt == "md":
        return markdown(report)
    return html(report, **page)


def html(
    report: Report,
    can_review: bool = False,
    notice: str | None = None,
    stale: str | None = None,
    csrf: str | None = None,
    nonce: str = "",
) -> str:
    """`stale`: production has changed since the evaluation (what it is now); the page
    then says so and offers to evaluate again instead of approving. `csrf`: the signed-in
    session's token, posted by every form (and with it a Sign out button). `nonce`: the
    response's CSP nonce, the only way the page's <style> is allowed."""
    template = _env().get_template("report.html")
    return template.render(
        r=report,
        chart=benchmark_chart(report.benchmarks),
        curve=curve_chart(report.training_curve),
        diffs=ordered_diffs(report.diffs)[:MAX_DIFFS],
        can_review=can_review
        and stale is None
        and report.review.status == "pending"
        and report.decision.decision == "pass",
        stale=stale if report.review.status == "pending" else None,
        notice=notice,
        csrf=csrf,
        nonce=nonce,
        max_note=MAX_NOTE_CHARS,
        pct=pct,
        diff_html=diff_html,
        evidence=evidence,
    )


def ordered_diffs(diffs: list[DiffItem]) -> list[DiffItem]:
    """Changed answers first (most changed first), then identical ones."""
    return sorted(diffs, key=lambda d: (d.identical, -abs(d.length_ratio - 1)))


def diff_html(item: DiffItem, side: Literal["production", "candidate"]) -> Markup:
    """One side of a diff: deletions marked on production, insertions on the candidate."""
    if item.identical:
        return Markup(escape(item.production.text))
    parts = []
    for op, text in item.diff:
        if op == "=":
            parts.append(escape(text))
        elif op == "-" and side == "production":
            parts.append(f"<del>{escape(text)}</del>")
        elif op == "+" and side == "candidate":
            parts.append(f"<ins>{escape(text)}</ins>")
    return Markup("".join(parts))


def pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1%}" if signed else f"{value:.1%}"


def benchmark_chart(scores: list[BenchmarkScore]) -> Markup:
    """Grouped horizontal bars (production, candidate) with 95% CI whiskers, 0-100%."""
    if not scores:
        return Markup("")
    left, width, row = 170, 460, 56
    height = 30 + row * len(scores)
    out = [
        f'<svg class="chart" viewBox="0 0 {left + width + 90} {height}" role="img" '
        'aria-label="Benchmark accuracy, production vs candidate">'
    ]
    for tick in range(0, 101, 25):
        x = left + width * tick / 100
        out.append(
            f'<line x1="{x}" y1="18" x2="{x}" y2="{height}" class="grid"/>'
            f'<text x="{x}" y="12" class="tick">{tick}%</text>'
        )
    for i, s in enumerate(scores):
        y = 24 + i * row
        out.append(f'<text x="{left - 8}" y="{y + 24}" class="label">{escape(s.task)}</text>')
        for j, (name, value, ci) in enumerate(
            (
                ("production", s.production, s.production_ci),
                ("candidate", s.candidate, s.candidate_ci),
            )
        ):
            by = y + j * 22
            out.append(
                f'<rect x="{left}" y="{by}" width="{width * value:.1f}" height="18" '
                f'class="bar {name}"><title>{name}: {value:.1%}</title></rect>'
                f'<line x1="{left + width * ci[0]:.1f}" x2="{left + width * ci[1]:.1f}" '
                f'y1="{by + 9}" y2="{by + 9}" class="ci"/>'
            )
        sign = "up" if s.delta > 0 else "down" if s.delta < 0 else "flat"
        out.append(
            f'<text x="{left + width + 10}" y="{y + 26}" class="delta {sign}">{s.delta:+.1%}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))


def curve_chart(points: list[dict[str, float]]) -> Markup:
    """The training loss by step, as a polyline."""
    losses = [(p["step"], p["loss"]) for p in points if "loss" in p]
    if len(losses) < 2:
        return Markup("")
    w, h, pad = 460, 140, 30
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0

    def xy(step: float, value: float) -> str:
        x = pad + (w - 2 * pad) * (step - steps[0]) / ((steps[-1] - steps[0]) or 1)
        y = pad / 2 + (h - pad) * (hi - value) / span
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(s, v) for s, v in losses)
    return Markup(
        f'<svg class="curve" viewBox="0 0 {w} {h}" role="img" aria-label="Training loss">'
        f'<polyline points="{line}" class="loss"/>'
        f'<text x="{pad}" y="{h - 2}" class="tick">step {steps[0]:g}</text>'
        f'<text x="{w - pad}" y="{h - 2}" class="tick end">step {steps[-1]:g}</text>'
        f'<text x="2" y="12" class="tick start">loss {hi:.3g}</text>'
        f'<text x="2" y="{h - pad + 10}" class="tick start">{lo:.3g}</text></svg>'
    )


def mark(c: Criterion) -> str:
    if not c.informative:
        return "⚪ uninformative"
    return "✅" if c.passed else "❌"


def evidence(b: BenchmarkScore) -> str:
    """Whether a benchmark can tell anything, and why not, for the tables."""
    if b.informative:
        return "informative"
    why = []
    if b.at_chance:
        why.append(f"at chance ({pct(b.chance or 0)})")
    if b.items_needed is not None and b.n < b.items_needed:
        why.append(f"needs {b.items_needed:,} items")
    return "uninformative: " + ", ".join(why)


def markdown(r: Report) -> str:
    lines = [
        f"# Promotion report {r.evaluation_id}: **{r.decision.decision.upper()}**",
        "",
        f"Candidate `{r.candidate.label}` vs production `{r.production.label}` "
        f"(base `{r.base_model}`), {r.created_at:%Y-%m-%d %H:%M %Z}. Mode: {r.mode}; "
        f"review: {r.review.status}" + (f" by {r.review.by}" if r.review.by else "") + ".",
        "",
        "## Criteria",
        "",
    ]
    lines += [f"- {mark(c)} **{c.name}**: {c.detail}" for c in r.decision.criteria]
    lines += [
        "",
        "## Benchmarks",
        "",
        "| task | n | production | candidate | delta (95% CI) | p | evidence |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {b.task} | {b.n} | {pct(b.production)} | {pct(b.candidate)} | "
        f"{pct(b.delta, True)} ({pct(b.ci_low, True)}..{pct(b.ci_high, True)}) | {b.p_value:.3f} | "
        f"{evidence(b)} |"
        for b in r.benchmarks
    ]
    if r.preference:
        p = r.preference
        lines += [
            "",
            "## Held-out preference accuracy",
            "",
            f"{pct(p.production)} (production) -> {pct(p.candidate)} (candidate) on {p.n} "
            f"pairs; gain {pct(p.delta, True)} (CI {pct(p.ci_low, True)}.."
            f"{pct(p.ci_high, True)}).",
        ]
    s = r.diff_summary
    lines += [
        "",
        "## Greedy A/B diff",
        "",
        f"{s.n} prompts, {pct(s.identical)} identical, mean length ratio "
        f"{s.mean_length_ratio:.2f}.",
        "",
        "| flag | production | candidate |",
        "|---|---|---|",
    ]
    lines += [f"| {f} | {pct(v.production)} | {pct(v.candidate)} |" for f, v in s.flags.items()]
    for d in ordered_diffs(r.diffs)[:20]:
        lines += [
            "",
            f"**{d.source}**: {d.prompt}",
            "",
            f"- production: {d.production.text!r}",
            f"- candidate: {d.candidate.text!r}",
        ]
    return "\n".join(lines) + "\n"


def _load(name: str) -> str | None:
    entry = resources.files("serve").joinpath("templates", name)
    return entry.read_text() if entry.is_file() else None


def _env() -> Environment:
    return Environment(loader=FunctionLoader(_load), autoescape=select_autoescape(default=True))
