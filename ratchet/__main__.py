"""`python -m ratchet ...`: the CLI, for launchers that take a module (accelerate launch -m)."""

from ratchet.cli import app

app(prog_name="ratchet")
