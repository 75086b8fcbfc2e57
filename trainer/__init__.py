"""trainer/: turns a preference snapshot into a LoRA adapter with TRL + PEFT.

Not built yet (issue 4). It will run as a job in the worker process, read
snapshots through feedback/'s repositories, and register adapters through
`ratchet.registry`; it never speaks HTTP to clients.
"""
