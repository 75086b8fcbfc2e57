"""trainer/: turns a preference snapshot into a LoRA adapter with TRL + PEFT.

`config.py` holds the one typed config; `dpo.py` trains; `artifacts.py` writes the
adapter atomically under its content hash with a training card, after a preflight
that vLLM can load it; `cli.py` is `ratchet train`. It reads snapshots through
`feedback.pairs` and registers adapters through `ratchet.registry`; it never speaks
HTTP to clients.
"""
