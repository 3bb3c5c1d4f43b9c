"""Where the workers find the model and the SAEs, and that each way of providing them works.

One layout everywhere: ``$SAESCOPE_CACHE`` = /mnt/saescope holds ``models/`` (the default model,
as ``saescope fetch-model`` writes it) and ``saes/<sae_id>/``. The image bakes into it
(BAKE_DEFAULT_MODEL, the ``saes`` build context); components/data-volume mounts a volume over
it; components/fetch-model fills ``models/`` at pod start. Whatever is not mounted over is read
from the image, so a baked model is used wherever no component replaces it.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from . import cluster, kustomize
from .paths import DOCKERFILE, K8S_DIR, OVERLAYS

CACHE = "/mnt/saescope"


def image_cache_dir() -> str:
    match = re.search(r"^ENV SAESCOPE_CACHE=(\S+)", DOCKERFILE.read_text(), re.M)
    assert match, "the Dockerfile sets SAESCOPE_CACHE"
    return match[1]


def worker_container(spec: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = spec["containers"][0]
    return container


def data_mounts(container: dict[str, Any]) -> dict[str, str]:
    """Mount path -> volume name, for mounts at or under SAESCOPE_CACHE."""
    return {
        m["mountPath"]: m["name"]
        for m in container.get("volumeMounts", [])
        if PurePosixPath(m["mountPath"]).is_relative_to(CACHE)
    }


def worker_spec_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec: dict[str, Any] = group["template"]["spec"]
    return spec


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_workers_read_the_cache_the_image_fills(kustomization: str) -> None:
    assert image_cache_dir() == CACHE
    for group in cluster.worker_groups(kustomization):
        assert cluster.env(worker_container(group["template"]["spec"]))["SAESCOPE_CACHE"] == {
            "name": "SAESCOPE_CACHE",
            "value": CACHE,
        }
    args = cluster.app_config(kustomization)["args"]
    assert args["model"] == "default"
    for sae in args["saes"]:
        # `default`: the SAE shipped inside the package, which the image installs (below)
        assert sae["path"] in ("default", f"{CACHE}/saes/{sae['sae_id']}")
    assert any(sae["path"] == "default" for sae in args["saes"])


def test_the_image_installs_the_shipped_default_sae() -> None:
    """The package the image installs carries the default SAE; nothing keeps it out."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY --chown=1000:100 training \./training$", text, re.M)
    rules = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    shipped = "training/saescope/default_sae/smollm2-135m-l15-topk/sae_weights.safetensors"
    assert not ignored(shipped, rules)
    assert ignored(".venv/bin/python", rules)  # the check itself can say no


def ignored(path: str, rules: list[str]) -> bool:
    """Whether a .dockerignore's ``rules`` keep ``path`` out: the last rule matching the path
    or one of its parent folders wins; ``!`` re-includes."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for rule in (r.strip() for r in rules):
        if not rule or rule.startswith("#"):
            continue
        negated, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        pattern = pattern.removeprefix("**/")
        if any(
            fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pattern)
            for p in prefixes
        ):
            out = not negated
    return out


def test_dockerfile_bakes_model_and_saes_into_the_cache() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BAKE_DEFAULT_MODEL=0$", text, re.M)
    assert 'if [ "$BAKE_DEFAULT_MODEL" = "1" ]; then saescope fetch-model; fi' in text
    assert re.search(r"^FROM scratch AS saes$", text, re.M), "the named build context's stand-in"
    assert re.search(rf"^COPY --chown=1000:100 --from=saes / {CACHE}/saes/$", text, re.M)


def test_cpu_overlay_reads_what_the_image_baked() -> None:
    """Nothing is mounted over the cache: a model and SAEs baked in are what the workers use."""
    for group in cluster.worker_groups("overlays/cpu"):
        spec = group["template"]["spec"]
        assert data_mounts(worker_container(spec)) == {}
        assert "initContainers" not in spec


def test_gpu_overlay_reads_the_data_volume() -> None:
    for group in cluster.worker_groups("overlays/gpu"):
        spec = group["template"]["spec"]
        (mount,) = [m for m in worker_container(spec)["volumeMounts"] if m["mountPath"] == CACHE]
        assert mount["readOnly"] is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim == {"claimName": "saescope-data", "readOnly": True}
        assert "initContainers" not in spec


def test_fetch_model_fills_the_models_folder_the_workers_read(tmp_path: Path) -> None:
    spec = worker_spec_of(cluster.with_component("fetch-model", tmp_path))
    (init,) = spec["initContainers"]
    assert init["command"] == ["saescope", "fetch-model"]
    assert cluster.env(init)["SAESCOPE_CACHE"]["value"] == CACHE
    models = f"{CACHE}/models"
    init_mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    worker_mounts = data_mounts(worker_container(spec))
    assert worker_mounts == {models: init_mounts[models]["name"]}, "only models/: SAEs stay"
    assert not init_mounts[models].get("readOnly")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[worker_mounts[models]]


def test_data_volume_component_mounts_the_claim_over_the_cache(tmp_path: Path) -> None:
    spec = worker_spec_of(cluster.with_component("data-volume", tmp_path))
    assert set(data_mounts(worker_container(spec))) == {CACHE}


def test_fetch_model_and_data_volume_are_not_combined() -> None:
    """A volume mounted read-only at the cache cannot take a mount point inside it."""
    for overlay in OVERLAYS:
        data = yaml.safe_load((K8S_DIR / overlay / "kustomization.yaml").read_text())
        used = {Path(c).name for c in data.get("components", [])}
        assert not {"fetch-model", "data-volume"} <= used, overlay


def test_components_use_the_renderer_subset() -> None:
    """The Python renderer builds every component (anything outside its subset raises)."""
    for component in (K8S_DIR / "components").iterdir():
        data = kustomize.load_kustomization(component)
        assert data["kind"] == "Component", component
