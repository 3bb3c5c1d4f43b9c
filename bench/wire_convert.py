"""What conversion by shape costs: the service's and the SDK's converters on large messages.

``saescope.api.v1.shapes`` converts dataclasses to messages and back from their field names
(issue 12), where the converters used to be written by hand per message. The baseline is that
hand-written code, kept here for the two largest shapes (verbatim from ``service/convert.py``
and ``client/_convert.py`` before the change), in the same run:

- ``encode activations``: the engine's ``ActivationsResult`` → ``GetFeatureActivationsResponse``
  (``prompts × tokens`` tokens with ``top_k`` features each), what every activation call pays;
- ``decode contrast``: a ``SearchFeaturesByContrastResponse`` of hits with locations → the
  SDK's ``ContrastResult``;
- ``serialize`` (reference): protobuf's own ``SerializeToString`` of the encoded response.

Times are medians of interleaved rounds; ratio < 1: by shape is faster.

    python -m bench.wire_convert
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from bench import common

NAME = "wire_convert"
TITLE = "Conversion by shape vs hand-written converters"


def parser() -> argparse.ArgumentParser:
    p = common.base_parser(__doc__ or "")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=512, help="tokens per prompt")
    p.add_argument("--top-k", type=int, default=16, help="features per token")
    p.add_argument("--hits", type=int, default=512, help="contrast hits per direction")
    return p


# ---- the hand-written baselines (as they were) -----------------------------------------------
def _by_hand_activations(res: Any) -> Any:
    from saescope.api.v1 import saescope_pb2 as pb
    from saescope.service.convert import dense_to_proto

    def token(tok: Any) -> Any:
        return pb.Token(id=tok.id, text=tok.text, start=tok.start, end=tok.end, special=tok.special)

    prompts = [
        pb.PromptActivations(
            tokens=[token(tok) for tok in p.tokens],
            token_top_features=[
                pb.SparseFeatures(features=s.features, values=s.values)
                for s in p.token_top_features
            ],
            feature_values=dense_to_proto(p.feature_values),
            top_features=pb.SparseFeatures(
                features=p.top_features.features, values=p.top_features.values
            ),
            error_norms=p.error_norms,
            residual_norms=p.residual_norms,
            out_of_distribution=p.out_of_distribution,
        )
        for p in res.prompts
    ]
    return pb.GetFeatureActivationsResponse(sae_id=res.sae_id, prompts=prompts)


def _by_hand_contrast(m: Any) -> Any:
    from saescope.client import results as r

    def hit(h: Any) -> Any:
        return r.ContrastHit(
            feature=h.feature,
            mean_positive=h.mean_positive,
            mean_negative=h.mean_negative,
            mean_difference=h.mean_difference,
            effect_size=h.effect_size,
            auroc=h.auroc,
            p_value=h.p_value,
            p_value_corrected=h.p_value_corrected,
            frac_active_positive=h.frac_active_positive,
            frac_active_negative=h.frac_active_negative,
            locations=[
                r.FeatureLocation(x.positive, x.prompt_index, x.token_index, x.token, x.value)
                for x in h.locations
            ],
        )

    return r.ContrastResult(
        sae_id=m.sae_id,
        positive_hits=[hit(h) for h in m.positive_hits],
        negative_hits=[hit(h) for h in m.negative_hits],
        features_tested=m.features_tested,
    )


# ---- inputs ---------------------------------------------------------------------------------
def _activations(n_prompts: int, n_tokens: int, k: int) -> Any:
    import numpy as np

    from saescope.service import types as t

    rng = np.random.default_rng(0)

    def prompt() -> t.PromptActivations:
        tokens = [t.Token(i, f"tok{i}", i, i + 1, i == 0) for i in range(n_tokens)]
        top = [
            t.Sparse(rng.integers(0, 16384, k).tolist(), rng.random(k).tolist())
            for _ in range(n_tokens)
        ]
        return t.PromptActivations(
            tokens=tokens,
            token_top_features=top,
            feature_values=rng.random((n_tokens, 8)).astype(np.float32),
            top_features=t.Sparse(list(range(10)), [1.0] * 10),
            error_norms=rng.random(n_tokens).tolist(),
            residual_norms=rng.random(n_tokens).tolist(),
            out_of_distribution=[i == 0 for i in range(n_tokens)],
        )

    return t.ActivationsResult("sae", [prompt() for _ in range(n_prompts)])


def _contrast(n_hits: int) -> Any:
    from saescope.api.v1 import saescope_pb2 as pb

    def hit(i: int) -> Any:
        locations = [
            pb.FeatureLocation(positive=j % 2 == 0, prompt_index=j, token_index=3, token="x")
            for j in range(4)
        ]
        return pb.ContrastHit(feature=i, mean_positive=1.5, auroc=0.9, locations=locations)

    hits = [hit(i) for i in range(n_hits)]
    return pb.SearchFeaturesByContrastResponse(
        sae_id="sae", positive_hits=hits, negative_hits=hits, features_tested=4096
    )


# ---- measure --------------------------------------------------------------------------------
def _seconds(fn: Callable[[], Any]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def measure(args: argparse.Namespace) -> None:
    from saescope.api.v1 import saescope_pb2 as pb
    from saescope.client import _convert as sdk
    from saescope.client.results import ContrastResult
    from saescope.service import convert

    n_prompts, n_tokens, hits = (
        (2, 64, 32) if args.quick else (args.prompts, args.tokens, args.hits)
    )
    acts = _activations(n_prompts, n_tokens, args.top_k)
    contrast = _contrast(hits)
    by_shape = convert.response(acts, pb.GetFeatureActivationsResponse)
    assert by_shape == _by_hand_activations(acts), "the two encoders disagree"
    assert sdk.result(contrast, ContrastResult) == _by_hand_contrast(contrast)
    cases = {
        "encode activations, by shape": _seconds(
            lambda: convert.response(acts, pb.GetFeatureActivationsResponse)
        ),
        "encode activations, by hand": _seconds(lambda: _by_hand_activations(acts)),
        "serialize activations (protobuf)": _seconds(by_shape.SerializeToString),
        "decode contrast, by shape": _seconds(lambda: sdk.result(contrast, ContrastResult)),
        "decode contrast, by hand": _seconds(lambda: _by_hand_contrast(contrast)),
    }
    times = common.interleave(cases, rounds=args.rounds or (2 if args.quick else 15))
    ms = {name: 1e3 * common.median(values) for name, values in times.items()}
    rows: list[dict[str, Any]] = [
        {
            "conversion": "encode activations",
            "size": f"{n_prompts}×{n_tokens} tokens, top {args.top_k}",
            "by shape ms": round(ms["encode activations, by shape"], 2),
            "by hand ms": round(ms["encode activations, by hand"], 2),
            "ratio": round(
                ms["encode activations, by shape"] / ms["encode activations, by hand"], 3
            ),
            "protobuf serialize ms": round(ms["serialize activations (protobuf)"], 2),
        },
        {
            "conversion": "decode contrast",
            "size": f"2×{hits} hits, 4 locations each",
            "by shape ms": round(ms["decode contrast, by shape"], 2),
            "by hand ms": round(ms["decode contrast, by hand"], 2),
            "ratio": round(ms["decode contrast, by shape"] / ms["decode contrast, by hand"], 3),
            "protobuf serialize ms": None,
        },
    ]
    targets = [
        common.Target(
            f"{row['conversion']}: by shape / by hand", row["ratio"], 1.25, "<=", "medians"
        )
        for row in rows
    ]
    common.write_result(
        args.out,
        NAME,
        title=TITLE,
        params={"rounds": len(next(iter(times.values())))},
        rows=rows,
        targets=targets,
        caption="Median ms per conversion; ratio < 1: by shape is faster than by hand",
    )


def main(argv: list[str] | None = None) -> None:
    common.bench_main(parser(), argv, measure)


if __name__ == "__main__":
    main()
