"""The reliability probe keeps working, and the service keeps its error contract under it.

``bench.reliability_probe.probe`` runs in ``--quick`` sizes against the session's Serve instance
(the tiny model): every hand-made bad-input class answered with its promised status code and
details that name the field, nothing leaking internals, no INTERNAL or UNKNOWN among the fuzzed
requests, a full queue refusing with RESOURCE_EXHAUSTED, and a killed replica giving UNAVAILABLE
and then answering every RPC again (the SDK's retry across a kill is
``tests/service/test_grpc_replica_loss.py``'s).

Classes the service fails today are listed in ``KNOWN_FINDINGS`` (and in RELIABILITY.md's
findings); each must still fail, like a strict xfail, so that a fix shows up here: then delete
its entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import reliability_probe
from tests.support.serve import ServeInstance

pytestmark = pytest.mark.slow
FUZZ = 100
# Classes the service fails today, with why (each must still fail, like a strict xfail).
KNOWN_FINDINGS: dict[tuple[str, str], str] = {}


def test_the_probe_finds_the_contract_kept(serve_instance: ServeInstance, tmp_path: Path) -> None:
    result = reliability_probe.probe(
        serve_instance, fuzz=FUZZ, overload_calls=8, sdk_kill=False, log=lambda *_: None
    )
    totals = result.totals
    assert totals["classes"] >= reliability_probe.MIN_CLASSES, totals
    rpcs = {c["rpc"] for c in result.classes}
    assert rpcs == set(reliability_probe.RPCS), rpcs
    known = [c for c in result.classes if (c["rpc"], c["class"]) in KNOWN_FINDINGS]
    checked = [c for c in result.classes if (c["rpc"], c["class"]) not in KNOWN_FINDINGS]
    wrong = [c for c in checked if c["as expected"] != "yes"]
    assert not wrong, wrong
    unnamed = [c for c in checked if c["names field"] == "no"]
    assert not unnamed, unnamed
    leaking = [c for c in result.classes if c["leaks"] != "–"]
    assert not leaking and not result.leaks, (leaking, result.leaks)
    fixed = [(c["rpc"], c["class"]) for c in known if c["as expected"] == "yes"]
    assert len(known) == len(KNOWN_FINDINGS) and not fixed, (
        f"fixed: drop from KNOWN_FINDINGS {fixed}"
    )

    assert sum(result.fuzz["by code"].values()) == FUZZ
    assert not result.fuzz["findings"], result.fuzz["findings"]  # no INTERNAL / UNKNOWN
    assert result.fuzz["by code"].get("OK"), "no fuzzed request was valid: the fuzzer is broken"

    assert result.overload["bad"] == 0, result.overload
    assert result.overload["by code"].get("RESOURCE_EXHAUSTED"), result.overload
    assert result.overload["GetInfo afterwards"] == "OK"

    kill = result.kill
    assert kill is not None
    assert kill["stream code"] == "UNAVAILABLE", kill
    assert kill["after ok"] == kill["after calls"], kill["after"]

    doc = tmp_path / "RELIABILITY.md"
    path = reliability_probe.write(result, tmp_path, doc=doc)
    saved = json.loads(path.read_text())
    assert len(saved["rows"]) == totals["classes"]
    assert len(saved["series"]["findings"]) == len(KNOWN_FINDINGS)
    text = doc.read_text()
    for block in ("reliability_summary", "reliability_classes", "reliability_kill"):
        assert f"<!-- bench:begin {block} -->" in text
    assert "**GenerateSteered**" in text
