"""The drift check of issue 12 ("one word, one place"): every layer speaks the .proto's words.

``saescope.api.v1.vocabulary`` reads the API's vocabularies (intervention modes, scopes,
aggregations, finish reasons, stream branches) from the enums of ``saescope.proto``. Each layer
that spells those words out — the service's domain ``Literal``s and dispatch tables, the SDK's
word tuples, ``Literal``s and constructors, the CLI's ``steer`` flags, the Node client's
constructors — is compared with them here, so a value added to (or removed from) the .proto,
e.g. a ``MODE_SCALE``, fails a test in every layer that does not handle it yet.

Fast: no service is started (the service modules are imported, which imports torch).
"""

from __future__ import annotations

import argparse
import inspect
import json
import struct
import subprocess
import typing
from pathlib import Path

import pytest

import saescope.client
from saescope.api.v1 import vocabulary
from saescope.api.v1.vocabulary import Vocabulary
from saescope.cli import query
from saescope.cli.main import build_parser
from saescope.client import inputs, results
from tests.client.conftest import NODE_DIR


# ---- service --------------------------------------------------------------------------------
def test_service_domain_literals() -> None:
    from saescope.service import types

    assert typing.get_args(types.InterventionMode) == vocabulary.MODE.words
    assert typing.get_args(types.Scope) == vocabulary.SCOPE.words
    assert typing.get_args(types.Aggregation) == vocabulary.AGGREGATION.words
    assert typing.get_args(types.Branch) == vocabulary.BRANCH.words
    assert typing.get_args(types.OrderBy) == vocabulary.ORDER_BY.words
    # the service always says why a completion ended: never "unspecified" (number 0)
    finish = vocabulary.FINISH_REASON
    assert typing.get_args(types.FinishReason) == tuple(
        w for w in finish.words if w != finish.unspecified
    )


def test_service_dispatch_tables() -> None:
    from saescope.service import activations, contrast, steering

    # feature edits (name → function) and vector edits, every mode once
    assert vocabulary.MODE.words == steering.MODES
    assert set(steering.EDITS).isdisjoint(steering.VECTOR_MODES)
    assert set(steering.EDITS) | set(steering.VECTOR_MODES) == set(vocabulary.MODE.words)
    assert tuple(steering.SCOPE_PHASES) == vocabulary.SCOPE.words
    assert tuple(activations.AGGREGATES) == vocabulary.AGGREGATION.words
    assert tuple(contrast.ORDERS) == vocabulary.ORDER_BY.words


# ---- SDK ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("words", "vocab"),
    [
        (inputs.MODES, vocabulary.MODE),
        (inputs.SCOPES, vocabulary.SCOPE),
        (inputs.AGGREGATIONS, vocabulary.AGGREGATION),
        (typing.get_args(inputs.InterventionMode), vocabulary.MODE),
        (typing.get_args(inputs.Scope), vocabulary.SCOPE),
        (typing.get_args(inputs.Aggregation), vocabulary.AGGREGATION),
        (inputs.ORDERS, vocabulary.ORDER_BY),
    ],
    ids=["MODES", "SCOPES", "AGGREGATIONS", "InterventionMode", "Scope", "Aggregation", "ORDERS"],
)
def test_sdk_words(words: tuple[str, ...], vocab: Vocabulary) -> None:
    assert words == vocab.words


def test_sdk_result_literals() -> None:
    # a client may talk to a server that did not say why: "unspecified" is a word here (order
    # aside: the SDK lists it last)
    assert set(typing.get_args(results.FinishReason)) == set(vocabulary.FINISH_REASON.words)
    assert len(typing.get_args(results.FinishReason)) == len(vocabulary.FINISH_REASON.words)
    assert typing.get_args(results.Branch) == vocabulary.BRANCH.words


@pytest.mark.parametrize("mode", vocabulary.MODE.words)
def test_sdk_has_a_public_constructor_per_mode(mode: str) -> None:
    assert mode in saescope.client.__all__
    construct = getattr(saescope.client, mode)
    params = inspect.signature(construct).parameters
    required = [p for p in params.values() if p.default is inspect.Parameter.empty]
    # a feature (or, for a vector mode, a vector), then the value where the mode takes one
    target = [0.5, -1.0] if next(iter(params)) == "vector" else 3
    args = [target, *[1.0] * (len(required) - 1)]
    intervention = construct(*args)
    assert isinstance(intervention, saescope.client.Intervention)
    assert intervention.mode == mode
    if target == 3:
        assert intervention.feature == 3 and intervention.direction is None
    else:
        assert intervention.direction == (0.5, -1.0)
    for scope in vocabulary.SCOPE.words:
        assert construct(*args, scope=scope).scope == scope


# ---- CLI ------------------------------------------------------------------------------------
def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise AssertionError(f"no sub-command {name!r}")


def _steer_parser() -> argparse.ArgumentParser:
    return _subparser(_subparser(build_parser(), "query"), "steer")


def test_cli_steer_has_a_flag_per_mode(tmp_path: Path) -> None:
    steer = _steer_parser()
    flags = [
        option
        for action in steer._actions
        if action.dest == "interventions" and not isinstance(action, query._WhenAction)
        for option in action.option_strings
    ]
    assert flags == [f"--{mode}" for mode in vocabulary.MODE.words]
    vector_file = tmp_path / "v.json"
    vector_file.write_text("[0.5, -1.0]")
    for mode in vocabulary.MODE.words:
        help_text = next(a.help for a in steer._actions if f"--{mode}" in a.option_strings)
        vector = query._is_vector(mode)
        # the help comes from the SDK constructor's docstring
        assert help_text and ("vector in FILE" if vector else "feature F") in help_text
        target = str(vector_file) if vector else "3"
        spec = f"{target}=2.5" if query._takes_value(mode) else target
        for scope in vocabulary.SCOPE.words:
            args = steer.parse_args(["a prompt", f"--{mode}", f"{spec}@{scope}"])
            (edit,) = args.interventions
            assert (edit.mode, edit.scope) == (mode, scope)
            if vector:
                assert edit.direction == (0.5, -1.0) and edit.value == 2.5
            else:
                assert edit.feature == 3 and edit.direction is None
    assert not query._takes_value("ablate") and query._takes_value("clamp")
    assert query._is_vector("direction") and not query._is_vector("clamp")


# ---- Node -----------------------------------------------------------------------------------
NODE_WORDS = """
const m = require('./index.js');
process.stdout.write(JSON.stringify({
  modes: Object.keys(m.interventions),
  scopes: m.SCOPES,
  aggregations: m.AGGREGATIONS,
  orders: m.ORDERS,
  sent: Object.fromEntries(Object.entries(m.interventions).map(([w, f]) => [w, f(3).mode])),
  named: ['clamp', 'add', 'multiply', 'ablate', 'direction'].map(
    (w) => m[w] === m.interventions[w]),
  packed: m.direction([1.5, -2], 2).direction,
  badScope: (() => {
    try { m.clamp(3, 1, 'nowhere'); } catch (e) { return e.message; }
  })(),
}));
"""


def test_node_client_words(node: str) -> None:
    proc = subprocess.run(
        [node, "-e", NODE_WORDS], cwd=NODE_DIR, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    words = json.loads(proc.stdout)
    assert tuple(words["modes"]) == vocabulary.MODE.words
    assert tuple(words["scopes"]) == vocabulary.SCOPE.words
    assert tuple(words["aggregations"]) == vocabulary.AGGREGATION.words
    assert tuple(words["orders"]) == vocabulary.ORDER_BY.words
    mode_names = {
        w: vocabulary.MODE.enum.values_by_number[n].name for w, n in vocabulary.MODE.numbers.items()
    }
    assert words["sent"] == mode_names
    assert all(words["named"])  # the public clamp/add/multiply/ablate/direction exports hold
    packed = words["packed"]  # a vector goes as little-endian float32, with its shape
    assert packed["shape"] == [2]
    assert bytes(packed["data"]["data"]) == struct.pack("<2f", 1.5, -2.0)
    assert (
        words["badScope"] == f'scope: "nowhere" is not one of {", ".join(vocabulary.SCOPE.words)}'
    )
