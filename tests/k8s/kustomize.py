"""Build the kustomizations under k8s/: with a real kustomize when there is one, else in Python.

``build()`` prefers ``kustomize build``, then ``kubectl kustomize`` (kubectl embeds kustomize),
and falls back to ``build_python()``: a small renderer for exactly the subset k8s/ uses —
``resources`` (files and folders), ``components``, ``patches`` holding JSON6902 operations
(add, remove, replace, test) with a ``target``, ``images``, ``namespace``, and
``configMapGenerator`` with ``disableNameSuffixHash``. Anything else raises, so a manifest that
outgrows the subset fails loudly instead of rendering wrong; a test compares the two renderers
wherever a real kustomize exists.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "patches",
    "images",
    "namespace",
    "configMapGenerator",
    "generatorOptions",
}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}


class UnsupportedKustomization(ValueError):
    """The kustomization uses a feature the Python renderer does not implement."""


@dataclass(frozen=True)
class Rendered:
    """A built kustomization: its objects and which renderer produced them."""

    objects: list[Manifest]
    renderer: str


def binary_command() -> list[str] | None:
    """The command that runs a real kustomize build, or None if neither tool is installed."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def build_with_binary(command: list[str], path: Path) -> list[Manifest]:
    """Run a real kustomize build on ``path`` and parse its output."""
    done = subprocess.run(
        [*command, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} {path} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def build(path: Path) -> Rendered:
    """Build ``path`` with a real kustomize if available, else with the Python renderer."""
    command = binary_command()
    if command is None:
        return Rendered(build_python(path), "python")
    return Rendered(build_with_binary(command, path), " ".join(command))


def build_python(path: Path) -> list[Manifest]:
    """Build the kustomization in folder ``path`` in Python (the subset described above)."""
    kustomization = load_kustomization(path)
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise UnsupportedKustomization(f"{path} is a {kustomization['kind']}, not a Kustomization")
    return apply_kustomization(kustomization, path, [])


def load_kustomization(folder: Path) -> dict[str, Any]:
    """Read the kustomization file of ``folder`` and reject fields outside the subset."""
    for name in KUSTOMIZATION_FILES:
        candidate = folder / name
        if candidate.is_file():
            data: dict[str, Any] = yaml.safe_load(candidate.read_text()) or {}
            unsupported = set(data) - SUPPORTED_FIELDS
            if unsupported:
                raise UnsupportedKustomization(f"{candidate}: unsupported {sorted(unsupported)}")
            return data
    raise FileNotFoundError(f"no kustomization file in {folder}")


def apply_kustomization(
    kustomization: dict[str, Any], folder: Path, objects: list[Manifest]
) -> list[Manifest]:
    """Resources, then components, then generators, patches, images and namespace, in order."""
    objects = [*objects, *load_resources(kustomization.get("resources", []), folder)]
    for component in kustomization.get("components", []):
        component_dir = (folder / component).resolve()
        data = load_kustomization(component_dir)
        if data.get("kind") != "Component":
            raise UnsupportedKustomization(f"{component_dir} is not a Component")
        objects = apply_kustomization(data, component_dir, objects)
    objects = [*objects, *generate_config_maps(kustomization, folder)]
    for patch in kustomization.get("patches", []):
        objects = apply_patch(patch, folder, objects)
    for image in kustomization.get("images", []):
        for obj in objects:
            set_images(obj, image)
    if "namespace" in kustomization:
        for obj in objects:
            if obj.get("kind") not in CLUSTER_SCOPED_KINDS:
                obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    return objects


def load_resources(entries: list[str], folder: Path) -> list[Manifest]:
    """Objects of the listed files, and the builds of the listed folders."""
    objects: list[Manifest] = []
    for entry in entries:
        path = (folder / entry).resolve()
        if path.is_dir():
            objects.extend(build_python(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


def generate_config_maps(kustomization: dict[str, Any], folder: Path) -> list[Manifest]:
    """ConfigMaps of ``configMapGenerator`` (files and literals, no name hash)."""
    generators = kustomization.get("configMapGenerator", [])
    options = kustomization.get("generatorOptions", {})
    if generators and not options.get("disableNameSuffixHash"):
        raise UnsupportedKustomization("configMapGenerator needs disableNameSuffixHash: true")
    maps = []
    for generator in generators:
        unsupported = set(generator) - {"name", "files", "literals", "options"}
        if unsupported:
            raise UnsupportedKustomization(f"configMapGenerator: unsupported {sorted(unsupported)}")
        data: dict[str, str] = {}
        for spec in generator.get("files", []):
            key, _, file = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
            data[key] = (folder / file).read_text()
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        metadata: dict[str, Any] = {"name": generator["name"]}
        for field in ("labels", "annotations"):
            if field in generator.get("options", {}):
                metadata[field] = dict(generator["options"][field])
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return maps


def apply_patch(patch: dict[str, Any], folder: Path, objects: list[Manifest]) -> list[Manifest]:
    """Apply one ``patches`` entry (JSON6902 operations) to the objects its target selects."""
    if "path" in patch:
        operations = yaml.safe_load((folder / patch["path"]).read_text())
    else:
        operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise UnsupportedKustomization("only JSON6902 patches (a list of operations) are supported")
    target = patch.get("target")
    if not target:
        raise UnsupportedKustomization("a JSON6902 patch needs a target")
    matched = [obj for obj in objects if matches(obj, target)]
    if not matched:
        raise ValueError(f"patch target {target} matches no object")
    return [json6902(obj, operations) if obj in matched else obj for obj in objects]


def matches(obj: Manifest, target: dict[str, str]) -> bool:
    """Whether ``obj`` is selected by a patch target (group, version, kind, name, namespace)."""
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unsupported:
        raise UnsupportedKustomization(f"patch target: unsupported {sorted(unsupported)}")
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": obj.get("kind", ""),
        "name": obj.get("metadata", {}).get("name", ""),
        "namespace": obj.get("metadata", {}).get("namespace", ""),
    }
    return all(actual[key] == value for key, value in target.items())


def json6902(document: Manifest, operations: list[dict[str, Any]]) -> Manifest:
    """Apply JSON6902 operations (add, remove, replace, test) to a copy of ``document``."""
    result = copy.deepcopy(document)
    for operation in operations:
        op, tokens = operation["op"], pointer_tokens(operation["path"])
        parent, last = resolve_parent(result, tokens)
        if op == "test":
            if get_child(parent, last) != operation["value"]:
                raise ValueError(f"JSON6902 test failed at {operation['path']}")
        elif op == "remove":
            get_child(parent, last)
            del parent[int(last) if isinstance(parent, list) else last]
        elif op == "replace":
            get_child(parent, last)
            parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(
                operation["value"]
            )
        elif op == "add":
            value = copy.deepcopy(operation["value"])
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), value)
            else:
                parent[last] = value
        else:
            raise UnsupportedKustomization(f"JSON6902 op {op!r} is not supported")
    return result


def pointer_tokens(pointer: str) -> list[str]:
    """The reference tokens of a JSON pointer (RFC 6901), unescaped."""
    if not pointer.startswith("/"):
        raise ValueError(f"bad JSON pointer {pointer!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def resolve_parent(document: Any, tokens: list[str]) -> tuple[Any, str]:
    """The container holding the pointer's last token, and that token."""
    node = document
    for token in tokens[:-1]:
        node = get_child(node, token)
    return node, tokens[-1]


def get_child(node: Any, token: str) -> Any:
    """``node[token]`` for a dict or a list, raising KeyError when absent."""
    if isinstance(node, list):
        index = int(token)
        if not 0 <= index < len(node):
            raise KeyError(f"index {token} out of range")
        return node[index]
    if isinstance(node, dict) and token in node:
        return node[token]
    raise KeyError(f"{token!r} not found")


def set_images(node: Any, image: dict[str, str]) -> None:
    """Apply one ``images`` entry to every container and init container under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and "image" in container:
                        container["image"] = retag(container["image"], image)
            else:
                set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            set_images(item, image)


def retag(reference: str, image: dict[str, str]) -> str:
    """An image reference with name, tag or digest replaced when its name matches."""
    name, _, digest = reference.partition("@")
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    if name != image["name"]:
        return reference
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
