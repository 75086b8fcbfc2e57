"""`make install` leaves an environment where vLLM imports (no CUDA torchvision & co)."""

import importlib.util
import subprocess
import sys


def test_vllm_imports_in_a_fresh_interpreter() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    vllm_version, torch_version = result.stdout.split()
    assert vllm_version and torch_version.startswith("2.")


def test_cuda_media_packages_are_absent() -> None:
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} breaks `import vllm`"


def test_default_model_wheel_is_installed() -> None:
    from ratchet.model import find_default_gguf

    assert find_default_gguf().stat().st_size > 50_000_000
