"""k8s/Dockerfile: the Ray image the RayService pins, plus the package and its generated stubs.

No image is built here (no daemon, no registry): these are checks of the recipe's text.
"""

from __future__ import annotations

import re

import ray

from . import cluster
from .paths import DOCKERFILE, OVERLAYS

RAY_IMAGE = re.compile(
    r"^ARG RAY_IMAGE=rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<flavour>\w+)$", re.M
)


def test_default_base_image_is_rays_gpu_image_of_the_pinned_version() -> None:
    match = RAY_IMAGE.search(DOCKERFILE.read_text())
    assert match, "ARG RAY_IMAGE=rayproject/ray:<version>-py<python>-<flavour> not found"
    assert match["ray"] == ray.__version__ == "2.60.0"
    assert match["py"] == "311"
    assert match["flavour"] == "gpu"
    for overlay in OVERLAYS:
        assert cluster.ray_cluster(overlay)["rayVersion"] == match["ray"]
    assert "FROM ${RAY_IMAGE}" in DOCKERFILE.read_text()


def test_installs_the_package_with_its_generated_stubs_and_keeps_rays_version() -> None:
    text = DOCKERFILE.read_text()
    for root in ("protos", "training", "service", "clients"):
        assert re.search(rf"^COPY .*\b{root} \./{root}$", text, re.M), f"{root}/ is not copied"
    assert '".[serve]"' in text
    assert "--constraint /tmp/ray-constraint.txt" in text, "pip could replace the image's Ray"
    assert "import saescope.api.v1.saescope_pb2_grpc, saescope.service.app" in text


def test_runs_as_the_numeric_user_the_pods_expect() -> None:
    assert re.search(r"^USER 1000:100$", DOCKERFILE.read_text(), re.M)
    for overlay in OVERLAYS:
        ray_cluster = cluster.ray_cluster(overlay)
        groups = [ray_cluster["headGroupSpec"], *ray_cluster["workerGroupSpecs"]]
        for group in groups:
            security = group["template"]["spec"]["securityContext"]
            assert (security["runAsUser"], security["runAsGroup"]) == (1000, 100)


def test_build_context_is_limited_to_what_the_image_installs() -> None:
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :][:1] == ["*"], "start from an empty context"
    assert {"!protos/", "!service/", "!training/", "!clients/", "!pyproject.toml"} <= set(ignore)
