"""The CRD schemas are in the repository, unaltered, with their source, version and licence.

A clone of the repository alone validates every custom resource: nothing here looks outside it,
and nothing skips when a schema is missing (the manifest tests then fail on the missing file).
"""

from __future__ import annotations

import json

from . import schemas
from .paths import REPO_ROOT, SCHEMAS_DIR


def test_schemas_are_in_the_repository() -> None:
    assert SCHEMAS_DIR.is_relative_to(REPO_ROOT)
    for filename in schemas.CRD_SCHEMAS.values():
        schema = json.loads((SCHEMAS_DIR / filename).read_text())
        assert schema["type"] == "object" and "spec" in schema["properties"], filename


def test_schemas_match_the_recorded_checksums() -> None:
    """A schema edited by hand (or truncated) no longer matches its upstream version."""
    recorded = schemas.recorded_checksums()
    on_disk = {p.name for p in SCHEMAS_DIR.glob("*.schema.json")}
    assert set(recorded) == on_disk == set(schemas.CRD_SCHEMAS.values())
    for name, digest in recorded.items():
        assert schemas.file_checksum(SCHEMAS_DIR / name) == digest, name


def test_readme_states_source_version_and_licence() -> None:
    readme = (SCHEMAS_DIR / "README.md").read_text()
    for row in readme.splitlines():
        if ".schema.json |" in row:
            assert "https://github.com/" in row and "/blob/v" in row, row
    assert "Apache License 2.0" in readme
    licence = (SCHEMAS_DIR / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "prometheus-operator" in (SCHEMAS_DIR / "NOTICE").read_text()


def test_the_strict_schemas_still_accept_unknown_fields_where_the_crd_does() -> None:
    """serveConfigV2 is a string and pod templates are full PodSpecs: the strict copy forbids
    extra fields only where the CRD lists properties and does not preserve unknown ones."""
    schema = schemas.strict(
        {"type": "object", "properties": {"a": {"type": "object", "properties": {}}}}
    )
    assert schema["additionalProperties"] is False
    preserved = schemas.strict(
        {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True}
    )
    assert "additionalProperties" not in preserved
