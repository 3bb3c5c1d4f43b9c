"""k8s/Dockerfile: the Ray image the RayService pins, the serving dependencies at the versions
the suite passed with, then the package and its generated stubs.

No image is built here (no daemon, no registry): these are checks of the recipe's text, of the
requirement list it installs against the serving code's imports, and of the build context.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import ray
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from . import cluster
from .paths import CONSTRAINTS, DOCKERFILE, OVERLAYS, REPO_ROOT, SERVE_REQUIREMENTS

RAY_IMAGE = re.compile(
    r"^ARG RAY_IMAGE=rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<flavour>\w+)$", re.M
)
SOURCE_ROOTS = ("protos", "training", "service", "clients")
# What a serving replica, its gRPC proxy and `saescope fetch-model` import.
SERVING_ENTRY_POINTS = (
    "saescope.service.app",
    "saescope.service.proxy_patch",
    "saescope.api.v1.saescope_pb2_grpc",
    "saescope.cli.main",
    "saescope.cli.fetch",
)
# Imported only inside functions that serving never calls (training data and plots).
TRAINING_ONLY = {"datasets", "matplotlib", "pyarrow"}


def lines() -> list[str]:
    return DOCKERFILE.read_text().splitlines()


def first_line(pattern: str) -> int:
    for number, line in enumerate(lines()):
        if re.search(pattern, line):
            return number
    raise AssertionError(f"no line matches {pattern!r}")


def requirements() -> list[Requirement]:
    return [
        Requirement(line)
        for line in SERVE_REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_default_base_image_is_rays_gpu_image_of_the_pinned_version() -> None:
    match = RAY_IMAGE.search(DOCKERFILE.read_text())
    assert match, "ARG RAY_IMAGE=rayproject/ray:<version>-py<python>-<flavour> not found"
    assert match["ray"] == ray.__version__ == "2.60.0"
    assert match["py"] == "311"
    assert match["flavour"] == "gpu"
    for overlay in OVERLAYS:
        assert cluster.ray_cluster(overlay)["rayVersion"] == match["ray"]
    assert "FROM ${RAY_IMAGE}" in DOCKERFILE.read_text()


def test_dependencies_install_before_any_source_is_copied() -> None:
    """A source change must not invalidate the dependency layer (minutes of torch download)."""
    install = first_line(r"--requirement serve-requirements\.txt")
    assert first_line(r"^COPY .*constraints\.txt k8s/serve-requirements\.txt") < install
    for root in SOURCE_ROOTS:
        assert install < first_line(rf"^COPY .*\b{root} \./{root}$"), root
    assert install < first_line(r"^COPY .*pyproject\.toml")


def test_every_version_is_pinned_and_rays_is_the_images() -> None:
    text = DOCKERFILE.read_text()
    assert "--constraint constraints.txt --constraint ray-constraint.txt" in text
    assert "print(f'ray=={ray.__version__}')\" > ray-constraint.txt" in text
    pinned: dict[str, str] = {
        canonicalize_name(line.split("==")[0]): line.split("==")[1]
        for line in CONSTRAINTS.read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for requirement in requirements():
        name: str = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} would float: no pin in constraints.txt"
        assert not requirement.specifier, "versions come from constraints.txt only"
    assert pinned["ray"] == ray.__version__


def test_the_package_installs_without_extras_or_dependencies() -> None:
    """`.[serve]` would pull the training extras (datasets, matplotlib, pyarrow) into the image."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^RUN pip install --no-deps \. \\$", text, re.M)
    assert "[serve]" not in text and "[train]" not in text
    names = {canonicalize_name(r.name) for r in requirements()}
    assert not names & TRAINING_ONLY
    assert "import saescope.api.v1.saescope_pb2_grpc, saescope.service.app" in text


def module_file(module: str) -> Path | None:
    for root in SOURCE_ROOTS:
        base = REPO_ROOT / root / Path(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def serving_imports() -> tuple[set[str], set[str]]:
    """Top-level third-party modules the serving code imports: at module level, and anywhere
    (inside functions too), over every saescope module reachable from the entry points."""
    top_level: set[str] = set()
    anywhere: set[str] = set()
    todo, seen = list(SERVING_ENTRY_POINTS), set()
    while todo:
        module = todo.pop()
        path = module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        tree = ast.parse(path.read_text())
        body = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "saescope":
                    todo.append(name)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    anywhere.add(top)
                    if id(node) in body:
                        top_level.add(top)
    return top_level, anywhere


def closure(roots: list[Requirement]) -> set[str]:
    """The distributions ``roots`` install, transitively (extras followed, markers evaluated)."""
    found: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in roots]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in found:
            continue
        found.add(key)
        found.add(name)
        try:
            dependencies = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in dependencies:
            dependency = Requirement(line)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if dependency.marker is None or any(
                dependency.marker.evaluate(env) for env in environments
            ):
                todo.append((dependency, frozenset(dependency.extras)))
    return found


def test_serve_requirements_cover_what_serving_imports() -> None:
    top_level, anywhere = serving_imports()
    installed = closure(requirements())
    distributions = packages_distributions()
    missing = {
        module
        for module in anywhere - TRAINING_ONLY
        if not {canonicalize_name(d) for d in distributions.get(module, [module])} & installed
    }
    assert not missing, f"serving imports {sorted(missing)}, which the image would not install"
    assert not top_level & TRAINING_ONLY, "a training-only package imported at module level"
    assert "gguf" in {canonicalize_name(r.name) for r in requirements()}, "fetch-model needs it"


def test_runs_as_the_numeric_user_the_pods_expect() -> None:
    assert lines()[-2:] == ["USER 1000:100", "WORKDIR /home/ray"]
    for overlay in OVERLAYS:
        ray_cluster = cluster.ray_cluster(overlay)
        groups = [ray_cluster["headGroupSpec"], *ray_cluster["workerGroupSpecs"]]
        for group in groups:
            security = group["template"]["spec"]["securityContext"]
            assert (security["runAsUser"], security["runAsGroup"]) == (1000, 100)


def test_build_context_is_limited_to_what_the_image_installs() -> None:
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :][:1] == ["*"], "start from an empty context"
    copied = {
        "!constraints.txt",
        "!k8s/serve-requirements.txt",
        "!protos/",
        "!service/",
        "!training/",
        "!clients/",
        "!pyproject.toml",
        "!README.md",
    }
    assert copied <= set(ignore)
