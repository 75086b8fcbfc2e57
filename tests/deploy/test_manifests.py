"""deploy/ without Docker or a cluster: every kustomize build renders and validates
against the Kubernetes OpenAPI schemas, the compose file validates, the Dockerfiles
pass hadolint, and .env.example lists every setting."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ratchet.settings import Settings
from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
KUSTOMIZATIONS = ["base", "overlays/single-gpu", "overlays/cluster"]


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    assert found, f"{name} is needed: `make install` provides it"
    return found


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_kustomize_builds_validate(target: str, tmp_path: Path) -> None:
    built = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / target)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert kinds >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job",
        "Secret", "NetworkPolicy", "ConfigMap", "PersistentVolumeClaim",
    }  # fmt: skip
    rendered = tmp_path / "all.yaml"
    rendered.write_text(built.stdout)
    checked = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(rendered)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    vllm = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "vllm")
    container = vllm["spec"]["template"]["spec"]["containers"][0]
    assert "--enable-lora" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"]
    check_gateway_survives_restarts(docs)


def check_gateway_survives_restarts(docs: list[dict[str, Any]]) -> None:
    """Each gateway pod keeps its spool on a volume of its own, and has time to let
    requests finish and flush the spool before it is killed."""
    gateway = next(d for d in docs if d["metadata"]["name"] == "gateway"
                   and d["kind"] == "StatefulSet")  # fmt: skip
    pod = gateway["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    claims = {t["metadata"]["name"] for t in gateway["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert "spool" in claims and mounts["spool"] == env["RATCHET_SPOOL_DIR"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["RATCHET_SHUTDOWN_GRACE_S"])


def test_kubernetes_validate_catches_a_broken_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n"
                   "  replicas: many\n")  # fmt: skip
    checked = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(bad)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode != 0


def test_the_compose_file_validates(tmp_path: Path) -> None:
    compose = DEPLOY / "compose"
    env = tmp_path / ".env"
    shutil.copy(compose / ".env.example", env)
    shutil.copy(compose / "docker-compose.yml", tmp_path / "docker-compose.yml")
    checked = subprocess.run(
        [tool("docker-compose"), "-f", str(tmp_path / "docker-compose.yml"), "config"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RATCHET_", "DATABASE"))},
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    services = yaml.safe_load(checked.stdout)["services"]
    assert set(services) == {"postgres", "migrate", "vllm", "gateway", "worker"}
    assert services["gateway"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["postgres"]["healthcheck"]["test"]
    gateway = services["gateway"]
    assert "spool:/spool:rw" in gateway["volumes"], gateway["volumes"]  # a named volume
    assert gateway["environment"]["RATCHET_SPOOL_DIR"] == "/spool"
    assert "stop_grace_period" in gateway


def test_env_example_lists_every_setting() -> None:
    # A setting left at its default is listed commented out: `# RATCHET_X=value`.
    listed = {
        line.lstrip("# ").split("=", 1)[0]
        for line in (DEPLOY / "compose" / ".env.example").read_text().splitlines()
        if "=" in line and line.lstrip("# ").startswith(("RATCHET_", "POSTGRES_"))
    }
    expected = set()
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            expected |= {f"RATCHET_{name}__{sub}".upper() for sub in annotation.model_fields}
        else:
            expected.add(f"RATCHET_{name}".upper())
    assert expected <= listed, sorted(expected - listed)


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("*.Dockerfile")))
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    linted = subprocess.run(
        [tool("hadolint"), str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert linted.returncode == 0, linted.stdout


VLLM_IMAGE = re.compile(r"vllm/vllm-openai(?::(?P<tag>[\w.-]+))?")


def gpu_vllm_pin() -> str:
    """The vLLM version pyproject's `gpu` extra pins (`vllm==X`)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pins = [re.fullmatch(r"vllm==([\w.]+)", spec.replace(" ", "")) for spec in extras["gpu"]]
    versions = [m.group(1) for m in pins if m]
    assert len(versions) == 1, extras["gpu"]
    return versions[0]


def test_vllm_images_match_the_gpu_pin() -> None:
    # The engine image and the workers' `gpu` extra must be the same vLLM: an image
    # left behind keeps an old engine's CVEs and its LoRA/adapter API.
    wanted = "v" + gpu_vllm_pin()
    seen: dict[str, str | None] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".md", ".Dockerfile", ".example"}:
            for match in VLLM_IMAGE.finditer(path.read_text()):
                seen[f"{path.relative_to(DEPLOY)}: {match.group(0)}"] = match.group("tag")
    assert any(p.startswith("k8s/") for p in seen) and any(p.startswith("compose/") for p in seen)
    wrong = {where: tag for where, tag in seen.items() if tag != wanted}
    assert not wrong, f"every vllm-openai image must be tagged {wanted}: {wrong}"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_rendered_engine_image_matches_the_gpu_pin(target: str) -> None:
    # An overlay's `images:` could retag what the base names: check what is rendered.
    built = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / target)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    images = {
        container["image"]
        for doc in yaml.safe_load_all(built.stdout)
        if doc and doc["kind"] in {"Deployment", "StatefulSet", "Job"}
        for container in doc["spec"]["template"]["spec"]["containers"]
        if "vllm" in container["image"]
    }
    assert images == {f"vllm/vllm-openai:v{gpu_vllm_pin()}"}, images
