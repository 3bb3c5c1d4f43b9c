"""The web explorer's latency, against the same questions asked over gRPC in the same rounds.

- **Feature page.** A fresh load of ``#/feature/SAE/N`` in headless Chromium (Debian's, through
  Playwright), for features that fire in the catalog: the first contentful paint (the shell),
  and the moment the page has drawn the feature (its ``feature-rendered`` mark: GetInfo and
  GetFeature answered, examples, histogram and tables in the DOM), both from the navigation's
  start. Baseline: the page's GetFeature request as one gRPC call (a warm channel).
- **Streaming.** One ``StreamGenerateSteered`` request (a clamped feature, the baseline beside
  it, greedy) three ways: over gRPC (the stub), as NDJSON over HTTP from Python, and from the
  browser (``fetch`` and a stream reader in the page). Time to the first and the last token,
  and the median gap between tokens, of the steered branch, each way.

Targets: the HTTP stream's time to first token and its token gap ≤ 1.25× gRPC's (transcoding
must not cost a stream noticeably); the feature page drawn within 1 s on the CPU.

    python -m bench.web_latency      # the default model and SAE (with its catalog when built)
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import random
import time
import urllib.parse
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from bench import common
from bench.launcher import APP_NAME, BENCH_LIMITS, ServeSetup, start_app
from bench.launcher import app_args as bench_app_args

NAME = "web_latency"
STREAM_RATIO_TARGET = 1.25
PAGE_TARGET_MS = 1000.0
PROMPT = "Tell me about the sea."

# Runs in the page: the stream read with fetch, as the explorer reads it; arrival times in ms.
BROWSER_STREAM = """async (request) => {
  const start = performance.now();
  const r = await fetch("api/v1/StreamGenerateSteered", {method: "POST",
    headers: {"content-type": "application/json"}, body: JSON.stringify(request)});
  const reader = r.body.getReader(); const dec = new TextDecoder();
  let buf = "", times = [];
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let i; while ((i = buf.indexOf("\\n")) >= 0) {
      const ev = JSON.parse(buf.slice(0, i)); buf = buf.slice(i + 1);
      if (ev.token && ev.token.branch === "BRANCH_STEERED") times.push(performance.now() - start);
    }
  }
  return times;
}"""


def _timing(arrivals_s: list[float]) -> dict[str, float]:
    """From the steered branch's token arrivals (seconds from the request): time to the first
    and the last token, and the median gap between tokens. (Each decode step makes a steered
    and a baseline token together: gaps across both branches would halve with no meaning.)"""
    gaps = [b - a for a, b in itertools.pairwise(arrivals_s)]
    return {
        "ttft_s": arrivals_s[0],
        "last_s": arrivals_s[-1],
        "gap_s": common.median(gaps) if gaps else 0.0,
    }


def stream_request(setup: ServeSetup, feature: int, max_new_tokens: int) -> dict[str, Any]:
    return {
        "sae_id": setup.sae_id,
        "prompt": {"text": PROMPT},
        "interventions": [{"feature": feature, "mode": "MODE_CLAMP", "value": 8.0}],
        "sampling": {"max_new_tokens": max_new_tokens, "temperature": 0},
        "include_baseline": True,
    }


def grpc_stream(stub: Any, metadata: Any, request: dict[str, Any]) -> dict[str, float]:
    from google.protobuf import json_format

    from saescope.api.v1 import saescope_pb2 as pb

    msg = json_format.ParseDict(request, pb.GenerateSteeredRequest())
    start = time.perf_counter()
    times = [
        time.perf_counter() - start
        for ev in stub.StreamGenerateSteered(msg, metadata=metadata, timeout=600)
        if ev.HasField("token") and ev.token.branch == ev.BRANCH_STEERED
    ]
    return _timing(times)


def http_stream(base: str, request: dict[str, Any]) -> dict[str, float]:
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=600)
    start = time.perf_counter()
    conn.request(
        "POST",
        f"{url.path}api/v1/StreamGenerateSteered",
        json.dumps(request),
        {"content-type": "application/json"},
    )
    r = conn.getresponse()
    times = []
    while line := r.readline():
        if json.loads(line).get("token", {}).get("branch") == "BRANCH_STEERED":
            times.append(time.perf_counter() - start)
    conn.close()
    return _timing(times)


def page_load(page: Any, base: str, sae_id: str, feature: int) -> dict[str, float]:
    """A fresh load of the feature page: first contentful paint and feature drawn (seconds)."""
    page.goto("about:blank")
    page.goto(f"{base}#/feature/{sae_id}/{feature}")
    page.wait_for_selector(f"main[data-rendered='{feature}']", timeout=120_000)
    fcp, drawn = page.evaluate(
        """() => [performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? -1,
                  performance.getEntriesByName('feature-rendered')[0].startTime]"""
    )
    return {"fcp_s": fcp / 1e3, "drawn_s": drawn / 1e3}


def firing_features(stub: Any, metadata: Any, sae_id: str, n: int, seed: int) -> list[int]:
    """``n`` features that fire in the catalog (any, without one), sampled reproducibly."""
    from saescope.api.v1 import saescope_pb2 as pb

    info = stub.GetInfo(pb.GetInfoRequest(), metadata=metadata)
    sae = next(s for s in info.saes if s.sae_id == sae_id)
    rng = random.Random(seed)
    if not sae.has_catalog:
        return rng.sample(range(sae.d_sae), n)
    firing = []
    token = ""
    while True:
        res = stub.ListFeatures(
            pb.ListFeaturesRequest(
                sae_id=sae_id, page_size=200, page_token=token, min_density=1e-9
            ),
            metadata=metadata,
        )
        firing += [f.feature for f in res.features]
        token = res.next_page_token
        if not token or len(firing) >= 2000:
            break
    return rng.sample(firing, min(n, len(firing)))


def run(setup: ServeSetup, *, features: int, max_new_tokens: int, rounds: int) -> dict[str, Any]:
    import grpc
    from google.protobuf import json_format

    from saescope.api.v1 import saescope_pb2 as pb
    from saescope.api.v1 import saescope_pb2_grpc as pb_grpc
    from tests.support.browser import launch

    base = f"{setup.http_url}/{setup.application}/"
    channel = grpc.insecure_channel(setup.grpc_target)
    stub, md = pb_grpc.SaeScopeStub(channel), (("application", setup.application),)
    chosen = firing_features(stub, md, setup.sae_id, features, seed=3)
    page_request = {  # what the feature page asks (bench/web_latency mirrors feature.js)
        "sae_id": setup.sae_id,
        "top_logits": 10,
        "neighbours": 10,
        "examples_page_size": 8,
        "quantile_examples": 3,
    }
    series: dict[str, list[dict[str, float]]] = {
        "page": [], "grpc_get_feature": [], "grpc": [], "http": [], "browser": []
    }  # fmt: skip
    with launch() as browser:
        page = browser.new_page()
        page.goto(base)
        page.wait_for_selector("#sae option", state="attached", timeout=120_000)
        request = stream_request(setup, chosen[0], max_new_tokens)
        grpc_stream(stub, md, request)  # warm both paths
        http_stream(base, request)

        def get_feature(feature: int) -> float:
            msg = json_format.ParseDict(page_request | {"feature": feature}, pb.GetFeatureRequest())
            start = time.perf_counter()
            stub.GetFeature(msg, metadata=md, timeout=600)
            return time.perf_counter() - start

        def pages() -> float:
            for f in chosen:
                series["page"].append(page_load(page, base, setup.sae_id, f))
            return common.median([p["drawn_s"] for p in series["page"][-len(chosen) :]])

        def grpc_features() -> float:
            times = [get_feature(f) for f in chosen]
            series["grpc_get_feature"] += [{"s": t} for t in times]
            return common.median(times)

        def streamed(name: str, fn: Callable[[], dict[str, float]]) -> float:
            r = fn()
            series[name].append(r)
            return r["ttft_s"]

        cases: dict[str, Callable[[], float]] = {
            "feature page drawn": pages,
            "GetFeature over gRPC": grpc_features,
            "stream gRPC": partial(streamed, "grpc", partial(grpc_stream, stub, md, request)),
            "stream HTTP": partial(streamed, "http", partial(http_stream, base, request)),
            "stream browser": partial(
                streamed,
                "browser",
                lambda: _timing([t / 1e3 for t in page.evaluate(BROWSER_STREAM, request)]),
            ),
        }
        common.interleave(cases, rounds)
    channel.close()
    return summarise(series, features=len(chosen), max_new_tokens=max_new_tokens, rounds=rounds)


def summarise(series: dict[str, list[dict[str, float]]], **params: Any) -> dict[str, Any]:
    ms = lambda xs: round(1e3 * common.median(xs), 1)  # noqa: E731
    grpc_ttft = common.median([r["ttft_s"] for r in series["grpc"]])
    grpc_gap = common.median([r["gap_s"] for r in series["grpc"]])
    get_feature = common.median([r["s"] for r in series["grpc_get_feature"]])
    drawn = common.median([p["drawn_s"] for p in series["page"]])
    rows = [
        {
            "what": "feature page: first contentful paint",
            "ms (median)": ms([p["fcp_s"] for p in series["page"]]),
            "× gRPC": "",
        },
        {
            "what": "feature page: feature drawn",
            "ms (median)": ms([p["drawn_s"] for p in series["page"]]),
            "× gRPC": round(drawn / get_feature, 2),
        },
        {
            "what": "GetFeature over gRPC (baseline)",
            "ms (median)": ms([get_feature]),
            "× gRPC": 1.0,
        },
    ]
    grpc_last = common.median([r["last_s"] for r in series["grpc"]])
    for name, label in (("grpc", "gRPC"), ("http", "HTTP NDJSON"), ("browser", "browser fetch")):
        ttft = common.median([r["ttft_s"] for r in series[name]])
        gap = common.median([r["gap_s"] for r in series[name]])
        last = common.median([r["last_s"] for r in series[name]])
        rows.append(
            {
                "what": f"stream over {label}: first token / token gap / last token",
                "ms (median)": f"{1e3 * ttft:.1f} / {1e3 * gap:.1f} / {1e3 * last:.0f}",
                "× gRPC": f"{ttft / grpc_ttft:.2f} / {gap / grpc_gap:.2f} / {last / grpc_last:.2f}",
            }
        )
    http_ttft = common.median([r["ttft_s"] for r in series["http"]])
    http_gap = common.median([r["gap_s"] for r in series["http"]])
    targets = [
        common.Target("stream time to first token, HTTP / gRPC", http_ttft / grpc_ttft,
                      STREAM_RATIO_TARGET, "<="),
        common.Target("stream token gap, HTTP / gRPC", http_gap / grpc_gap,
                      STREAM_RATIO_TARGET, "<="),
        common.Target("feature page drawn (ms)", 1e3 * drawn, PAGE_TARGET_MS, "<="),
    ]  # fmt: skip
    return {"params": params, "rows": rows, "targets": targets, "series": series}


def measure(setup: ServeSetup, args: argparse.Namespace) -> None:
    rounds = args.rounds or (1 if args.quick else 5)
    if args.quick:
        res = run(setup, features=2, max_new_tokens=4, rounds=rounds)
    else:
        res = run(setup, features=12, max_new_tokens=32, rounds=rounds)
    common.write_run(
        args, NAME, res, title="Web explorer: feature page and streaming, against gRPC"
    )


@contextmanager
def serve_default_sae(args: argparse.Namespace) -> Any:
    """The default model and the shipped default SAE (its catalog, where built, is served)."""
    from saescope.training.default_sae import SAE_ID

    app = bench_app_args(Path("default"), torch_threads=args.threads, device=args.device)
    app["saes"] = [{"sae_id": SAE_ID, "path": "default"}]
    app["limits"] = BENCH_LIMITS
    with start_app(app) as (target, http_url):
        yield ServeSetup(target, APP_NAME, "default", SAE_ID, Path("default"), http_url=http_url)


def main(argv: list[str] | None = None) -> None:
    def served(args: argparse.Namespace) -> None:
        with serve_default_sae(args) as setup:
            measure(setup, args)

    common.bench_main(common.base_parser(__doc__ or ""), argv, served)


if __name__ == "__main__":
    main()
