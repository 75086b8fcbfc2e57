"""Errors of the promotion gate.

RatchetError
 └── EvalError              the gate could not judge a candidate
      ├── BenchmarkDataError  benchmark rows could not be obtained or read
      ├── AdapterNotApplied   the candidate scored exactly like production
      ├── EngineNotReady      the vLLM engine could not answer for the A/B diff
      ├── JudgeError          the judge model failed to give a verdict
      ├── PolicyError         the gate policy file cannot be read or is invalid
      └── EvaluationFailed    an evaluation could not run to a decision
"""

from ratchet.errors import RatchetError


class EvalError(RatchetError):
    """The promotion gate could not produce a trustworthy verdict."""


class BenchmarkDataError(EvalError):
    """Benchmark rows could not be fetched, unpacked or read; the message says what to do."""


class AdapterNotApplied(EvalError):
    """The candidate's loglikelihoods equal production's: its adapter changed nothing.

    Either the evaluation harness silently scored the base model, or the adapter is a
    no-op (all LoRA B matrices zero). Neither may be promoted or compared.
    """


class EngineNotReady(EvalError):
    """The vLLM engine was unreachable or refused the adapter during evaluation."""


class JudgeError(EvalError):
    """The judge model could not be reached or gave no usable answer."""


class PolicyError(EvalError):
    """The gate policy file cannot be read or does not validate."""


class EvaluationFailed(EvalError):
    """An evaluation could not run to a decision; the message says why."""
