"""Validate rendered objects: built-in kinds with kubernetes-validate, custom ones by schema.

The custom resources (RayService, PodMonitor, PrometheusRule) are checked against the CRD
schemas in ``<repo>/../shared/schemas``, made strict: every object schema that lists
``properties`` and does not preserve unknown fields gets ``additionalProperties: false``, so a
misspelt field fails instead of being pruned silently by the API server.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate

Manifest = dict[str, Any]

# (apiVersion, kind) -> schema file in shared/schemas.
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "rayservice_v1.schema.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor_v1.schema.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_v1.schema.json",
}
KUBERNETES_VERSION = kubernetes_validate.latest_version()


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


@cache
def crd_validator(schemas_dir: Path, filename: str) -> jsonschema.Draft4Validator:
    """A validator for one CRD schema file (OpenAPI v3 schemas are close to JSON Schema draft 4)."""
    schema = strict(json.loads((schemas_dir / filename).read_text()))
    return jsonschema.Draft4Validator(schema)


def is_custom(obj: Manifest) -> bool:
    """Whether ``obj`` is one of the custom kinds validated with a CRD schema."""
    return (obj.get("apiVersion"), obj.get("kind")) in CRD_SCHEMAS


def custom_errors(obj: Manifest, schemas_dir: Path) -> list[str]:
    """Schema violations of a custom resource, as 'path: message' lines."""
    filename = CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]
    validator = crd_validator(schemas_dir, filename)
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


def pod_template(name: str, template: dict[str, Any]) -> Manifest:
    """A pod template embedded in a custom resource, as a PodTemplate for kubernetes-validate."""
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }
