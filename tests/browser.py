"""Real Chromium for the report page tests: Debian's `chromium`, driven by Playwright
(never `playwright install`, which downloads a browser of its own)."""

import shutil

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip


def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "Debian's chromium is needed for the report tests: `make install` adds it"
    return found
