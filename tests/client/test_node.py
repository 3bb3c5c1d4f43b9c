"""The Node.js client (``clients/node``) against the real service: ``node example.js`` runs
every kind of call (info, tokenize, activations, generate, stream, feature, attribute, search,
an error).

Skipped, saying why, where ``node`` is not installed or ``npm install`` has not run there.
"""

from __future__ import annotations

import json
import os
import subprocess

from saescope.client import Client, clamp, direction
from tests.client.conftest import NODE_DIR
from tests.support.serve import ServeInstance


def test_node_example_runs_against_the_service(
    node: str, serve_instance: ServeInstance, client: Client
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SAESCOPE_API_KEY", "SAESCOPE_TARGET")}
    proc = subprocess.run(
        [node, "example.js", serve_instance.grpc_target],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    info = client.info()
    assert f"model: {info.model}" in out
    assert all(s.sae_id in out for s in info.saes)
    assert "error: NOT_FOUND" in out and out.rstrip().endswith("OK")
    expected = client.generate(
        "The quick brown fox jumps over the lazy dog",
        interventions=[{"feature": 3, "mode": "clamp", "value": 6.0}],
        max_new_tokens=8,
    )
    assert f'steered: "{expected.text}"' in out or f"steered: {expected.text!r}" in out
    # a vector packed by Node steers exactly as the same vector from Python
    hits = client.contrast(["Paris in spring", "I love Paris"], ["Tokyo at night", "Rome is old"])
    assert hits.difference_in_means is not None
    assert f"difference in means: {len(hits.difference_in_means)} floats" in out
    pushed = client.generate(
        "The quick brown fox jumps over the lazy dog",
        interventions=[direction(hits.difference_in_means, 30.0)],
        max_new_tokens=8,
    )
    assert f"direction: {json.dumps(pushed.text, ensure_ascii=False)}" in out
    # a condition built by Node fires where the same condition from Python does
    guarded = client.generate(
        "The quick brown fox jumps over the lazy dog",
        interventions=[clamp(3, 6.0).when(5, above=0.5)],
        max_new_tokens=8,
    )
    fired = ",".join(str(p) for p in guarded.steered.fired[0].positions)
    assert f"conditional: {json.dumps(guarded.text, ensure_ascii=False)} fired at [{fired}]" in out
    steerable = client.contrast(
        ["Paris in spring", "I love Paris"],
        ["Tokyo at night", "Rome is old"],
        top_n=2,
        order_by="output_score",
    )
    scored = ", ".join(f"{h.feature} {h.output_score:.4f}" for h in steerable.positive_hits)
    assert f"by output score: {scored}" in out
    why = client.attribute("The quick brown fox jumps over the lazy dog", top_n=3)
    target = json.dumps(why.target.text, ensure_ascii=False)
    assert f"attribution of {target}: {why.features[0].feature} " in out
    found = client.search_features("The quick brown fox", top_n=3)
    assert f"search: {', '.join(f'{h.feature} {h.matched}' for h in found.hits)}" in out
