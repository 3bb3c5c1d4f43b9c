"""Validate rendered objects: built-in kinds with kubernetes-validate, custom ones by schema.

The custom resources (RayService, RayJob, PodMonitor, ServiceMonitor, PrometheusRule) are checked
against the CRD schemas in ``tests/k8s/crd_schemas`` (in the repository: a clone never lacks them;
see that folder's README for their source, version and licence), made strict: every object schema
that lists ``properties`` and does not preserve unknown fields gets
``additionalProperties: false``, so a misspelt field fails instead of being pruned silently by
the API server.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate

from .paths import SCHEMAS_DIR

Manifest = dict[str, Any]

# (apiVersion, kind) -> schema file in tests/k8s/crd_schemas.
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "rayservice_v1.schema.json",
    ("ray.io/v1", "RayJob"): "rayjob_v1.schema.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor_v1.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_v1.schema.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_v1.schema.json",
}
KUBERNETES_VERSION = kubernetes_validate.latest_version()
# A row of the README's table: | file | kind | source | version | sha256 |
_README_ROW = re.compile(r"^\| (\S+\.schema\.json) \|(.*)\| ([0-9a-f]{64}) \|$", re.M)


def strict(schema: Any) -> Any:
    """A copy of ``schema`` where object schemas with ``properties`` forbid other fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


def recorded_checksums(schemas_dir: Path = SCHEMAS_DIR) -> dict[str, str]:
    """The sha256 of each schema file, as the folder's README records it."""
    readme = (schemas_dir / "README.md").read_text()
    return {name: digest for name, _, digest in _README_ROW.findall(readme)}


def file_checksum(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@cache
def crd_validator(filename: str, schemas_dir: Path = SCHEMAS_DIR) -> jsonschema.Draft4Validator:
    """A validator for one CRD schema file (OpenAPI v3 schemas are close to JSON Schema draft 4)."""
    schema = strict(json.loads((schemas_dir / filename).read_text()))
    return jsonschema.Draft4Validator(schema)


def is_custom(obj: Manifest) -> bool:
    """Whether ``obj`` is one of the custom kinds validated with a CRD schema."""
    return (obj.get("apiVersion"), obj.get("kind")) in CRD_SCHEMAS


def custom_errors(obj: Manifest) -> list[str]:
    """Schema violations of a custom resource, as 'path: message' lines."""
    validator = crd_validator(CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])])
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


def builtin_errors(obj: Manifest) -> list[str]:
    """Strict kubernetes-validate errors of a built-in kind (empty when valid)."""
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"no schema for {obj.get('apiVersion')} {obj.get('kind')}: not built in, no known CRD"
        ]
    except kubernetes_validate.ValidationError as error:
        path = "/".join(str(p) for p in error.path) or "<root>"
        return [f"{path}: {error.message}"]
    return []


def errors(obj: Manifest) -> list[str]:
    """Validation errors of any rendered object: by CRD schema or as a built-in kind."""
    return custom_errors(obj) if is_custom(obj) else builtin_errors(obj)


def pod_template(name: str, template: dict[str, Any]) -> Manifest:
    """A pod template embedded in a custom resource, as a PodTemplate for kubernetes-validate."""
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }
