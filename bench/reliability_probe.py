"""Reliability probe: bad input, fuzz, overload and a replica kill, through the real service.

Issue 11's probe kept as a script. It starts a local Ray Serve instance with the saescope app on
the tests' tiny random model and SAEs (``tests/support/serve.py``: ``start_serve``) and deploys a
second app beside it, ``saescope-probe-strict`` (an API key, one request at a time and one
queued, small per-call token and response budgets). Then, over gRPC like any client:

1. **bad-input classes** (``reliability_cases``): over a hundred hand-made requests across all
   eight RPCs, each with the status code the API promises; per class the code got, whether the
   details name the field or limit, and whether they leak internals (``reliability_calls``);
2. **fuzz** (``reliability_fuzz``): N random requests from a seeded generator over every field,
   a tenth of them mutated bytes, four at a time; codes counted; INTERNAL or UNKNOWN is a
   finding, and so is a leak;
3. **overload**: concurrent generations against the strict app; RESOURCE_EXHAUSTED vs OK
   counted, INTERNAL must not occur, and the app answers afterwards;
4. **replica kill**: the strict app's replica actor killed (``ray.kill``) under a stream: the
   caller must see UNAVAILABLE; the time until GetInfo succeeds again, the codes seen meanwhile,
   one call of every RPC afterwards; and (full runs) a second kill under an SDK call with
   retries, which must carry the call through.

Results (``reliability_report``): ``bench/results/reliability_probe.json`` and the generated
blocks of ``RELIABILITY.md`` (written only for the default ``--out``). ``--quick``: 100 fuzz
requests, a smaller overload, no SDK kill.

    python -m bench.reliability_probe [--quick] [--fuzz N] [--seed S]

:func:`probe` takes a running ``ServeInstance``, so ``tests/bench/test_reliability_probe.py``
runs it against the test session's instance.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import common
from bench.reliability_calls import RPCS, Metadata, Outcome, call, leaks, names
from bench.reliability_cases import Case, Context, cases, gen, samp, text
from bench.reliability_fuzz import Fuzzer
from bench.reliability_report import write
from saescope.api.v1 import saescope_pb2 as pb
from tests.support.serve import (
    TEST_API_KEY,
    TEST_API_KEY_ENV,
    ServeInstance,
    non_loopback_address,
    start_serve,
)

DOC = common.ROOT / "RELIABILITY.md"
STRICT_APP = "saescope-probe-strict"
MIN_CLASSES = 60
BAD_CODES = ("INTERNAL", "UNKNOWN")
OK = grpc.StatusCode.OK


@dataclass
class ProbeResult:
    """What :func:`probe` measured (each part as JSON-able rows and counts)."""

    params: dict[str, Any]
    classes: list[dict[str, Any]]
    fuzz: dict[str, Any]
    overload: dict[str, Any]
    kill: dict[str, Any] | None
    leaks: list[dict[str, Any]] = field(default_factory=list)  # outside the classes
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase

    @property
    def totals(self) -> dict[str, int]:
        named = [c["names field"] for c in self.classes if c["names field"] != "–"]
        return {
            "classes": len(self.classes),
            "as expected": sum(c["as expected"] == "yes" for c in self.classes),
            "with a field to name": len(named),
            "naming it": sum(n == "yes" for n in named),
            "leaking internals": sum(c["leaks"] != "–" for c in self.classes),
        }

    def targets(self) -> list[common.Target]:
        t = self.totals
        with_field = max(t["with a field to name"], 1)
        fuzz_bad = sum(self.fuzz["by code"].get(c, 0) for c in BAD_CODES)
        out = [
            common.Target("bad-input classes", t["classes"], MIN_CLASSES, ">="),
            common.Target(
                "classes answered as promised (fraction)",
                t["as expected"] / max(t["classes"], 1),
                1.0,
                ">=",
            ),
            common.Target(
                "details name the field or limit (fraction)", t["naming it"] / with_field, 1, ">="
            ),
            common.Target(
                "details leaking internals (all phases)",
                t["leaking internals"] + len(self.leaks),
                0,
                "<=",
            ),
            common.Target("fuzz: INTERNAL or UNKNOWN", fuzz_bad, 0, "<="),
            common.Target("overload: INTERNAL or UNKNOWN", self.overload["bad"], 0, "<="),
            common.Target(
                "overload: RESOURCE_EXHAUSTED",
                self.overload["by code"].get("RESOURCE_EXHAUSTED", 0),
                1,
                ">=",
            ),
        ]
        if self.kill is not None:
            k = self.kill
            out += [
                common.Target(
                    "replica kill: the stream ends UNAVAILABLE",
                    float(k["stream code"] == "UNAVAILABLE"),
                    1,
                    ">=",
                ),
                common.Target(
                    "replica kill: every RPC OK after recovery (fraction)",
                    k["after ok"] / max(k["after calls"], 1),
                    1,
                    ">=",
                ),
            ]
        return out

    def findings(self) -> list[str]:
        """Every departure from the contract, one line each (empty: none)."""
        out = []
        for c in self.classes:
            if c["as expected"] != "yes" or c["names field"] == "no" or c["leaks"] != "–":
                out.append(
                    f"{c['rpc']} / {c['class']}: expected {c['expected']}, got {c['got']}"
                    f" (names field: {c['names field']}, leaks: {c['leaks']}): {c['details']!r}"
                )
        for f in self.fuzz["findings"]:
            out.append(f"fuzz {f['rpc']}: {f['code']} {f['details']!r} for {f['request']}")
        for leak in self.leaks:
            out.append(f"{leak['where']}: details leak {leak['leaks']}: {leak['details']!r}")
        if self.overload["bad"]:
            out.append(f"overload: {self.overload['by code']}")
        if not self.overload["by code"].get("RESOURCE_EXHAUSTED"):
            out.append(f"overload: nothing was refused ({self.overload['by code']})")
        if self.kill is not None:
            k = self.kill
            if k["stream code"] != "UNAVAILABLE":
                out.append(f"replica kill: the stream ended {k['stream code']}: {k['details']!r}")
            bad = set(k["codes while recovering"]) - {"UNAVAILABLE", "OK", "DEADLINE_EXCEEDED"}
            if bad:
                out.append(f"replica kill: while recovering {k['codes while recovering']}")
            if k["after ok"] != k["after calls"]:
                out.append(f"replica kill: after recovery {k['after']}")
            if k.get("sdk call ok") is False:
                out.append(f"replica kill: the SDK's call failed: {k.get('sdk error')!r}")
            if k.get("sdk call in flight at the kill") is False:
                out.append("replica kill: the SDK's call ended before the kill (not exercised)")
        return out


# ---- setup ---------------------------------------------------------------------------------------
def strict_overrides(instance: ServeInstance, limits: pb.Limits) -> dict[str, Any]:
    """The strict app: a key, one request at a time, one queued, small per-call budgets (4
    prompts' worth of tokens; a response budget of 64 KiB, the least the config allows)."""
    budgets = {
        "max_tokens_per_call": 4 * limits.max_tokens_per_prompt,
        "max_response_bytes": 2**16,
    }
    return {
        "api_key_env": TEST_API_KEY_ENV,
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
        "limits": dict(instance.app_args.get("limits", {})) | budgets,
    }


def calibrate(channel: grpc.Channel, md: Metadata, max_tokens: int) -> tuple[str, str]:
    """A text that just fits ``max_tokens`` tokens, and one repetition more that does not."""
    word = "banana "

    def fits(n: int) -> bool:
        out = call(channel, "Tokenize", pb.TokenizeRequest(prompt=text(word * n)), md)
        if out.code not in (OK, grpc.StatusCode.OUT_OF_RANGE):
            raise RuntimeError(f"calibrating with Tokenize: {out.code_name} {out.details}")
        return out.code == OK

    lo, hi = 1, 2 * max_tokens  # fits(lo); not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return word * lo, word * hi


# ---- 1. bad-input classes ------------------------------------------------------------------------
def run_cases(instance: ServeInstance, all_cases: list[Case]) -> list[dict[str, Any]]:
    """Each case once, one after another; a row per case."""
    channels: dict[str, grpc.Channel] = {}
    rows = []
    for case in all_cases:
        target = case.target or instance.grpc_target
        if target not in channels:
            channels[target] = grpc.insecure_channel(target)
        out = call(channels[target], case.rpc, case.build(), case.metadata, timeout=case.timeout)
        named = names(out.details, case.needle, out.code)
        leaked = leaks(out.details)
        rows.append(
            {
                "rpc": case.rpc,
                "class": case.name,
                "expected": case.expected.name,
                "got": out.code_name,
                "as expected": "yes" if out.code == case.expected else "NO",
                "names field": "–" if named is None else ("yes" if named else "no"),
                "leaks": ", ".join(leaked) or "–",
                "details": _short(out.details),
            }
        )
    for ch in channels.values():
        ch.close()
    return rows


def _short(details: str, limit: int = 140) -> str:
    one_line = details.replace("\n", " ")
    return one_line if len(one_line) <= limit else one_line[:limit] + f"… ({len(details)} chars)"


# ---- 2. fuzz -------------------------------------------------------------------------------------
def run_fuzz(
    instance: ServeInstance, ctx: Context, n: int, *, seed: int, workers: int = 4
) -> dict[str, Any]:
    """``n`` random requests, ``workers`` at a time; codes by RPC; INTERNAL/UNKNOWN recorded."""
    fuzzer = Fuzzer(seed, ctx.limits, ctx.d_sae)
    requests = [fuzzer.next() for _ in range(n)]
    channel = instance.channel()
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(
            pool.map(lambda r: call(channel, r.rpc, r.request, ctx.metadata, timeout=120), requests)
        )
    seconds = time.perf_counter() - start
    by_code: Counter[str] = Counter(o.code_name for o in outcomes)
    by_rpc: dict[str, Counter[str]] = {rpc: Counter() for rpc in RPCS}
    by_kind: dict[str, Counter[str]] = {}
    findings, leaked = [], []
    clean_refused: dict[str, dict[str, Any]] = {}  # "CODE field" → count and one example
    for req, out in zip(requests, outcomes, strict=True):
        by_rpc[req.rpc][out.code_name] += 1
        by_kind.setdefault(req.kind, Counter())[out.code_name] += 1
        record = {"rpc": req.rpc, "code": out.code_name, "details": _short(out.details, 300)}
        if out.code_name in BAD_CODES:
            findings.append(record | {"request": req.describe()})
        if found := leaks(out.details):
            leaked.append(record | {"leaks": found, "request": req.describe()})
        if req.kind == "clean" and out.code != OK:
            field_ = re.sub(r"\[\d+\]", "[i]", out.details.split(":", 1)[0])
            key = f"{out.code_name} {field_}"
            seen = clean_refused.setdefault(key, {"count": 0, "example": record["details"]})
            seen["count"] += 1
    return {
        "requests": n,
        "seed": seed,
        "workers": workers,
        "seconds": round(seconds, 1),
        "by code": dict(by_code.most_common()),
        "by rpc": {rpc: dict(c.most_common()) for rpc, c in by_rpc.items()},
        "by kind": {k: dict(c.most_common()) for k, c in by_kind.items()},
        "findings": findings,
        "leaks": leaked,
        "clean requests refused": dict(
            sorted(clean_refused.items(), key=lambda kv: -int(kv[1]["count"]))
        ),
    }


# ---- 3. overload ---------------------------------------------------------------------------------
def run_overload(instance: ServeInstance, md: Metadata, calls: int) -> dict[str, Any]:
    """``calls`` generations (half unary, half streamed) released at once against an app that
    takes one request at a time and queues one."""
    channel = instance.channel()
    req = gen(sampling=samp(max_new_tokens=64))
    ready = threading.Barrier(calls)

    def one(i: int) -> Outcome:
        rpc = "GenerateSteered" if i % 2 == 0 else "StreamGenerateSteered"
        ready.wait()
        return call(channel, rpc, req, md, timeout=120)

    start = time.perf_counter()
    with ThreadPoolExecutor(calls) as pool:
        outcomes = list(pool.map(one, range(calls)))
    seconds = time.perf_counter() - start
    by_code: Counter[str] = Counter(o.code_name for o in outcomes)
    refused = [o.details for o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    after = call(channel, "GetInfo", pb.GetInfoRequest(), md, timeout=30)
    return {
        "calls": calls,
        "seconds": round(seconds, 1),
        "by code": dict(by_code.most_common()),
        "bad": sum(by_code.get(c, 0) for c in BAD_CODES),
        "refusal details": sorted(set(refused)),
        "GetInfo afterwards": after.code_name,
        "_details": [o.details for o in outcomes if o.details] + [after.details],
    }


# ---- 4. replica kill -----------------------------------------------------------------------------
def kill_replica(app: str) -> None:
    """Kill the app's replica actor, as the OOM killer or a lost node would."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#"
    (replica,) = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)


def after_recovery_calls(ctx: Context) -> dict[str, pb.GenerateSteeredRequest | Any]:
    """One ordinary call of every RPC."""
    return {
        "GetInfo": pb.GetInfoRequest(),
        "Tokenize": pb.TokenizeRequest(prompt=text("Hello world")),
        "GetFeatureActivations": pb.GetFeatureActivationsRequest(
            prompts=[text("Hello world")], top_k_per_token=3
        ),
        "GenerateSteered": gen(),
        "StreamGenerateSteered": gen(),
        "SearchFeaturesByContrast": pb.SearchFeaturesByContrastRequest(
            positive=[text("I love Paris"), text("Paris in spring")],
            negative=[text("The cat sat"), text("A dog barked")],
        ),
        "GetFeature": pb.GetFeatureRequest(feature=1),
        "AttributeFeatures": pb.AttributeFeaturesRequest(prompt=text("The cat sat on the")),
    }


def run_kill(
    instance: ServeInstance, ctx: Context, app: str, md: Metadata, *, sdk: bool
) -> dict[str, Any]:
    """Kill the replica under a stream; then recovery; then (``sdk``) under an SDK call."""
    channel = instance.channel()
    long = gen(sampling=samp(max_new_tokens=ctx.limits.max_new_tokens))
    stream = channel.unary_stream("/saescope.api.v1.SaeScope/StreamGenerateSteered")(
        long.SerializeToString(), metadata=md, timeout=120
    )
    next(stream)  # the first token arrived: the replica is decoding this call
    kill_replica(app)
    killed = time.monotonic()
    events, code, details = 1, "OK", ""
    try:
        for _ in stream:
            events += 1
    except grpc.RpcError as e:
        code, details = e.code().name, e.details() or ""
    seen: Counter[str] = Counter()
    polled: list[str] = []
    while True:
        out = call(channel, "GetInfo", pb.GetInfoRequest(), md, timeout=5)
        seen[out.code_name] += 1
        polled.append(out.details)
        if out.code == OK:
            break
        if time.monotonic() - killed > 300:
            break
        time.sleep(0.25)
    recovery_s = time.monotonic() - killed
    after = {
        rpc: call(channel, rpc, req, md, timeout=60).code_name
        for rpc, req in after_recovery_calls(ctx).items()
    }
    result: dict[str, Any] = {
        "stream code": code,
        "details": details,
        "stream events before the end": events,
        "recovery s": round(recovery_s, 1),
        "codes while recovering": dict(seen.most_common()),
        "after": after,
        "after calls": len(after),
        "after ok": sum(c == "OK" for c in after.values()),
        "_details": [details, *polled],
    }
    if sdk:
        result |= sdk_kill(instance, app, md, ctx.limits.max_new_tokens)
    return result


def sdk_kill(
    instance: ServeInstance, app: str, md: Metadata, max_new_tokens: int
) -> dict[str, Any]:
    """A second kill, while an SDK ``Client`` (with retries) generates: does the call succeed?

    The strict app takes one request at a time, so the replica cannot be asked whether it is
    decoding (the question would queue behind the generation): the same generation is timed
    first, and the kill lands at 40% of that time into the SDK's call.
    """
    from saescope.client import Client, RetryPolicy

    req = gen(sampling=samp(max_new_tokens=max_new_tokens, seed=0))
    alone = call(instance.channel(), "GenerateSteered", req, md, timeout=300)
    patient = RetryPolicy(max_attempts=30, initial_backoff=0.5, max_backoff=2.0)
    outcome: dict[str, Any] = {"generation alone s": round(alone.seconds, 1)}

    def generate() -> None:
        start = time.monotonic()
        with Client(
            instance.grpc_target, application=app, api_key=TEST_API_KEY, retry=patient, timeout=300
        ) as c:
            try:
                c.generate("Hello", max_new_tokens=max_new_tokens, seed=0)
                outcome["sdk call ok"] = True
            except Exception as e:  # reported, not raised: the probe records failures
                outcome["sdk call ok"] = False
                outcome["sdk error"] = f"{type(e).__name__}: {e}"
        outcome["sdk call s"] = round(time.monotonic() - start, 1)

    caller = threading.Thread(target=generate)
    caller.start()
    time.sleep(max(0.2, 0.4 * alone.seconds))
    outcome["sdk call in flight at the kill"] = caller.is_alive()
    kill_replica(app)
    caller.join(timeout=400)
    return outcome


# ---- the probe -----------------------------------------------------------------------------------
def probe(
    instance: ServeInstance,
    *,
    fuzz: int = 1000,
    seed: int = 0,
    overload_calls: int = 16,
    kill: bool = True,
    sdk_kill: bool = True,
    log: Any = print,
) -> ProbeResult:
    """Run the four phases against ``instance`` (its app and a strict app deployed beside it)."""
    channel = instance.channel()
    info = pb.GetInfoResponse.FromString(
        channel.unary_unary("/saescope.api.v1.SaeScope/GetInfo")(
            b"", metadata=instance.metadata, timeout=60
        )
    )
    near, over = calibrate(channel, instance.metadata, info.limits.max_tokens_per_prompt)
    overrides = strict_overrides(instance, info.limits)
    seconds: dict[str, float] = {}
    log(f"deploying {STRICT_APP} …")
    with (
        timed(seconds, "deploy strict app"),
        instance.deploy_app(STRICT_APP, **overrides) as strict_md,
    ):
        ctx = Context(
            limits=info.limits,
            d_sae={s.sae_id: s.d_sae for s in info.saes},
            default_sae_id=info.default_sae_id,
            metadata=instance.metadata,
            strict_metadata=(*strict_md, ("x-api-key", TEST_API_KEY)),
            strict_app=STRICT_APP,
            near_limit_text=near,
            over_limit_text=over,
            remote_target=_remote_target(instance),
        )
        all_cases = cases(ctx)
        log(f"1/4 {len(all_cases)} bad-input classes …")
        with timed(seconds, "classes"):
            classes = run_cases(instance, all_cases)
        log(f"2/4 fuzz: {fuzz} requests (seed {seed}) …")
        with timed(seconds, "fuzz"):
            fuzzed = run_fuzz(instance, ctx, fuzz, seed=seed)
        log(f"3/4 overload: {overload_calls} concurrent generations …")
        with timed(seconds, "overload"):
            overload = run_overload(instance, ctx.strict_metadata, overload_calls)
        killed = None
        if kill:
            log("4/4 replica kill …")
            with timed(seconds, "replica kill"):
                killed = run_kill(instance, ctx, STRICT_APP, ctx.strict_metadata, sdk=sdk_kill)
    seconds["deploy strict app"] -= sum(v for k, v in seconds.items() if k != "deploy strict app")
    other = [("overload", d) for d in overload.pop("_details")]
    if killed is not None:
        other += [("replica kill", d) for d in killed.pop("_details")]
    extra_leaks = [
        {"where": where, "leaks": found, "details": _short(d)}
        for where, d in other
        if (found := leaks(d))
    ] + [{"where": "fuzz", **f} for f in fuzzed["leaks"]]
    params = {
        "fuzz requests": fuzz,
        "seed": seed,
        "overload calls": overload_calls,
        "replica kill": kill,
        "sdk kill": kill and sdk_kill,
        "limits": {f.name: v for f, v in info.limits.ListFields()},
        "strict app": {k: v for k, v in overrides.items() if k != "limits"}
        | {
            "budgets": {
                k: overrides["limits"][k] for k in ("max_tokens_per_call", "max_response_bytes")
            }
        },
    }
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    return ProbeResult(params, classes, fuzzed, overload, killed, extra_leaks, seconds)


@contextlib.contextmanager
def timed(into: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to ``into[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        into[name] = into.get(name, 0.0) + time.perf_counter() - start


def _remote_target(instance: ServeInstance) -> str | None:
    addr = non_loopback_address()
    return None if addr is None else f"{addr}:{instance.grpc_target.rsplit(':', 1)[1]}"


# ---- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--quick", action="store_true", help="100 fuzz requests, no SDK kill")
    p.add_argument("--fuzz", type=int, default=None, help="fuzz requests (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="the fuzz generator's seed")
    p.add_argument("--no-kill", action="store_true", help="skip the replica kill")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="where results go")
    args = p.parse_args(argv)
    fuzz = args.fuzz if args.fuzz is not None else (100 if args.quick else 1000)
    with (
        tempfile.TemporaryDirectory(prefix="saescope-probe-") as tmp,
        start_serve(Path(tmp)) as instance,
    ):
        result = probe(
            instance,
            fuzz=fuzz,
            seed=args.seed,
            overload_calls=8 if args.quick else 16,
            kill=not args.no_kill,
            sdk_kill=not args.quick,
        )
    default_out = args.out.resolve() == common.RESULTS_DIR
    write(result, args.out, doc=DOC if default_out else None)
    findings = result.findings()
    print(f"{len(findings)} findings" + "".join(f"\n  - {f}" for f in findings))


if __name__ == "__main__":
    main()
