"""``saescope query``: call a running service from the shell, for people (tables, colours,
streamed text) or scripts (``--json``).

    saescope query info
    saescope query tokenize "The Eiffel Tower"
    saescope query activations "The Eiffel Tower is in Paris" --top-k 3 --features 12,99
    saescope query steer "My favourite food is" --clamp 123=8 --baseline
    saescope query steer "My favourite food is" --clamp 123=8 --when '77>2.5'
    saescope query contrast --positive-file french.txt --negative-file english.txt
    saescope query feature 123 --examples 5
    saescope query features --max-density 0.01 --label ocean
    saescope query search "ocean"
    saescope query attribute "The Eiffel Tower is in" --target-text " Paris"

Imports only ``saescope.client`` (grpcio + protobuf), never torch or ray. Errors print
``saescope query: CODE: message`` on stderr and exit 1, without a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saescope.cli import query_output as out
from saescope.client import Client, FeaturePage, Intervention, SaescopeError, TokenEvent, inputs
from saescope.client._channel import DEFAULT_TIMEOUT, ENV_API_KEY, ENV_TARGET
from saescope.client.inputs import AGGREGATIONS, MODES, ORDERS, SCOPES, ChatMessage, PromptLike

Handler = Callable[[Client, argparse.Namespace], None]


def _mode_help(mode: str) -> str:
    """What ``steer --MODE`` does: the first sentence of the SDK's constructor of that mode
    (``saescope.client.clamp``: "Set ``feature`` to ``value``…" → "set feature F to V")."""
    doc = (getattr(inputs, mode).__doc__ or "").split(".")[0].split(" (")[0]
    for word, letter in (
        ("``feature``", "feature F"),
        ("``value``", "V"),
        ("``factor``", "V"),
        ("``vector``", "the vector in FILE"),
    ):
        doc = doc.replace(word, letter)
    return doc[:1].lower() + doc[1:]


def _takes_value(mode: str) -> bool:
    """Whether the mode's SDK constructor takes a value (``ablate`` does not)."""
    return len(inspect.signature(getattr(inputs, mode)).parameters) > 2


def register(subparsers: Any) -> None:
    """Add ``query`` and its sub-commands to the ``saescope`` parser."""
    query = subparsers.add_parser(
        "query",
        help="query a running saescope service (info, tokenize, activations, steer, ...)",
        description="Call a running saescope service. Human-friendly output by default, "
        "--json for scripts.",
    )
    _connection_options(query, suppress=False)
    sub = query.add_subparsers(dest="query_command", required=True, metavar="QUERY")
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, suppress=True)

    def command(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, parents=[common], help=help, description=help)
        parser.set_defaults(func=lambda args: _run(handler, args))
        return parser

    command("info", _info, "the model, its SAEs, limits and version")

    p = command("tokenize", _tokenize, "tokens, ids and offsets of a prompt")
    _prompt_options(p, many=False)

    p = command("activations", _activations, "per-token top features of prompts")
    _prompt_options(p, many=True)
    _sae_option(p)
    p.add_argument("--top-k", type=int, default=5, help="features per token (default 5)")
    p.add_argument("--features", type=_int_list, default=[], help="e.g. 12,99: values per token")
    p.add_argument("--top-k-aggregated", type=int, default=10, help="per prompt (default 10)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="max")
    p.add_argument("--include-special-tokens", action="store_true")

    p = command("steer", _steer, "generate with features steered (streamed)")
    _prompt_options(p, many=False)
    _sae_option(p)
    for mode in MODES:  # one flag per intervention mode, from the SDK's constructors
        p.add_argument(
            f"--{mode}",
            dest="interventions",
            action="append",
            type=_intervention_parser(mode),
            default=[],
            metavar=_intervention_form(mode) + "[@SCOPE]",
            help=f"{_mode_help(mode)}; SCOPE: {', '.join(SCOPES)} (default all). Repeatable.",
        )
    p.add_argument(
        "--when",
        action=_WhenAction,
        dest="interventions",
        metavar="F>T|FILE>T",
        help="the intervention before it applies only where feature F, or the residual's "
        "projection on the vector in FILE, is above T (quote it: '>' is the shell's)",
    )
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--baseline", action="store_true", help="also unsteered, side by side")
    p.add_argument("--logprobs", action="store_true", help="per-token log-probabilities")
    p.add_argument("--trace", action="store_true", help="the steered features per position")

    p = command("contrast", _contrast, "features that separate two prompt sets")
    _sae_option(p)
    for side in ("positive", "negative"):
        p.add_argument(f"--{side}", action="append", default=[], metavar="PROMPT")
        p.add_argument(
            f"--{side}-file",
            type=Path,
            action="append",
            default=[],
            metavar="FILE",
            help="one prompt per line, or .jsonl with a 'text' field or chat 'messages'",
        )
    p.add_argument("--aggregation", choices=("max", "mean"), default="max")
    p.add_argument("--top-n", type=int, default=10)
    p.add_argument("--locations", type=int, default=0, help="where each hit fires (per hit)")
    p.add_argument(
        "--order-by",
        choices=ORDERS,
        default="effect_size",
        help="output_score: the strongest hits reranked by their effect on the output (the "
        "ones to steer with)",
    )
    p.add_argument(
        "--output-scores", action="store_true", help="score each hit's effect on the output"
    )
    p.add_argument(
        "--save-direction",
        type=Path,
        metavar="FILE",
        help="write the difference-in-means vector (JSON) to FILE: steer with --direction FILE=V",
    )

    p = command("feature", _feature, "one feature: logits, neighbours, examples")
    p.add_argument("feature_id", type=int, metavar="FEATURE")
    _sae_option(p)
    p.add_argument("--top-logits", type=int, default=10)
    p.add_argument("--neighbours", type=int, default=10)
    p.add_argument("--direction", action="store_true", help="include the decoder direction")
    p.add_argument("--examples", type=int, default=None, help="top examples per page (catalog)")
    p.add_argument("--examples-page-token", default="", metavar="TOKEN", help="the next page")
    p.add_argument(
        "--quantile-examples", type=int, default=None, metavar="N", help="examples per bin"
    )

    p = command("features", _features, "list features with their labels (needs a catalog)")
    _sae_option(p)
    p.add_argument("--min-density", type=float, default=None, metavar="D", help="e.g. 0.0001")
    p.add_argument("--max-density", type=float, default=None, metavar="D", help="e.g. 0.01")
    p.add_argument("--label", default="", help="label contains this text (case-insensitive)")
    p.add_argument("--page-size", type=int, default=None, help="features per page (default 50)")
    p.add_argument("--page-token", default="", metavar="TOKEN", help="the next page")
    p.add_argument("--all", action="store_true", help="every page (with --json: JSON lines)")

    p = command("search", _search, "features for a text: by label and context, and by firing")
    p.add_argument("query", metavar="TEXT")
    _sae_option(p)
    p.add_argument("--top-n", type=int, default=None, help="hits (default 10)")

    p = command("attribute", _attribute, "which features make the model predict a token")
    _prompt_options(p, many=False)
    _sae_option(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--target-text",
        metavar="TEXT",
        help="the target as text, exactly one token (e.g. ' Paris'); default: the model's own "
        "next token",
    )
    target.add_argument("--target-token", type=int, metavar="ID", help="the target's token id")
    p.add_argument("--top-n", type=int, default=10, help="features to list (default 10)")


# ---- options ------------------------------------------------------------------------------
def _connection_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted both before and after the sub-command (``query --json info`` and
    ``query info --json``); after it, they only override when given."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--target",
        default=default(os.environ.get(ENV_TARGET, "localhost:9000")),
        help=f"host:port of the service (env {ENV_TARGET}; default localhost:9000)",
    )
    parser.add_argument("--api-key", default=default(None), help=f"API key (env {ENV_API_KEY})")
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline per call in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--application", default=default("saescope"), help="Ray Serve application name"
    )
    parser.add_argument("--secure", action="store_true", default=default(False), help="use TLS")
    parser.add_argument(
        "--root-certs", type=Path, default=default(None), help="PEM roots (implies TLS)"
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON for scripts"
    )


def _prompt_options(parser: argparse.ArgumentParser, *, many: bool) -> None:
    parser.add_argument("prompts", nargs="*" if many else 1, metavar="PROMPT")
    if many:
        parser.add_argument(
            "--file", type=Path, action="append", default=[], help="prompts from a file"
        )
    parser.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message of a chat"
    )
    parser.add_argument("--system", default=None, help="system message (implies --chat)")


def _sae_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae-id", default=None, help="which SAE (default: the service's)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None


def _is_vector(mode: str) -> bool:
    """Whether the mode's SDK constructor takes a vector (``direction``), not a feature."""
    return next(iter(inspect.signature(getattr(inputs, mode)).parameters)) == "vector"


def _intervention_form(mode: str) -> str:
    if _is_vector(mode):
        return "FILE=V"
    return "F=V" if _takes_value(mode) else "F"


def load_vector(path: Path) -> list[float]:
    """A vector from a file: a JSON list of numbers (what ``contrast --save-direction``
    writes), or numbers separated by spaces, commas or newlines."""
    text = path.read_text(encoding="utf-8")
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        values = text.replace(",", " ").split()
    return [float(x) for x in values]


def _intervention_parser(mode: str) -> Callable[[str], Intervention]:
    def parse(text: str) -> Intervention:
        spec, _, scope = text.partition("@")
        target, _, value = spec.partition("=")
        try:
            if _takes_value(mode) != bool(value):
                raise ValueError
            if _is_vector(mode):
                try:
                    vector = tuple(load_vector(Path(target)))
                except OSError as e:
                    raise argparse.ArgumentTypeError(
                        f"cannot read {target}: {e.strerror}"
                    ) from None
                return Intervention(0, mode, float(value), scope or "all", vector)  # type: ignore[arg-type]
            return Intervention(int(target), mode, float(value or 0.0), scope or "all")  # type: ignore[arg-type]
        except (ValueError, SaescopeError):
            raise argparse.ArgumentTypeError(
                f"expected {_intervention_form(mode)}[@{'|'.join(SCOPES)}], got {text!r}"
            ) from None

    return parse


class _WhenAction(argparse.Action):
    """``--when F>T`` / ``--when FILE>T``: a condition on the intervention given just before."""

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any, _opt: Any = None
    ) -> None:
        edits: list[Intervention] = getattr(ns, self.dest, None) or []
        if not edits:
            parser.error("--when: give it after the intervention it conditions (e.g. --clamp)")
        target, sep, threshold = str(value).rpartition(">")
        try:
            above = float(threshold)
            if not sep or not target:
                raise ValueError
        except ValueError:
            parser.error(f"--when: expected F>T or FILE>T, got {value!r}")
        if target.isdigit():
            edit = edits[-1].when(int(target), above=above)
        else:
            try:
                edit = edits[-1].when(direction=load_vector(Path(target)), above=above)
            except OSError as e:
                parser.error(f"--when: cannot read {target}: {e.strerror}")
        setattr(ns, self.dest, [*edits[:-1], edit])


# ---- prompts ------------------------------------------------------------------------------
def load_prompts(path: Path) -> list[PromptLike]:
    """Prompts from a file: ``.jsonl`` (``text`` or chat ``messages`` per line) or plain text
    (one prompt per non-empty line)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".ndjson"):
        return list(lines)
    prompts: list[PromptLike] = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e.msg}") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            prompts.append(record["text"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompts.append(record["messages"])
        else:
            raise ValueError(f"{path}:{n}: expected an object with 'text' or 'messages'")
    return prompts


def _as_prompt(text: str, args: argparse.Namespace) -> PromptLike:
    if not (args.chat or args.system):
        return text
    messages = [ChatMessage("system", args.system)] if args.system else []
    return [*messages, ChatMessage("user", text)]


def _prompts(args: argparse.Namespace) -> list[PromptLike]:
    prompts = [_as_prompt(text, args) for text in args.prompts]
    for path in getattr(args, "file", []):
        prompts.extend(load_prompts(path))
    if not prompts:
        raise ValueError("no prompt: give PROMPT arguments or --file")
    return prompts


# ---- commands -----------------------------------------------------------------------------
def _run(handler: Handler, args: argparse.Namespace) -> int:
    key = args.api_key if args.api_key is not None else os.environ.get(ENV_API_KEY)
    try:
        with Client(
            args.target,
            api_key=key,
            application=args.application,
            secure=args.secure,
            root_certificates=args.root_certs,
            timeout=args.timeout,
        ) as client:
            handler(client, args)
    except SaescopeError as e:
        print(f"saescope query: {e.code}: {e.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `saescope query ... | head`
        sys.stderr.close()
    return 0


def _info(client: Client, args: argparse.Namespace) -> None:
    info = client.info()
    out.emit(args, info, lambda: out.info(info, client.target))


def _tokenize(client: Client, args: argparse.Namespace) -> None:
    result = client.tokenize(_as_prompt(args.prompts[0], args))
    out.emit(args, result, lambda: out.tokenization(result))


def _activations(client: Client, args: argparse.Namespace) -> None:
    result = client.activations(
        _prompts(args),
        sae_id=args.sae_id,
        top_k=args.top_k,
        features=args.features,
        top_k_aggregated=args.top_k_aggregated,
        aggregation=args.aggregation,
        include_special_tokens=args.include_special_tokens,
    )
    out.emit(args, result, lambda: out.activations(result, args.aggregation))


def _steer(client: Client, args: argparse.Namespace) -> None:
    kwargs: dict[str, Any] = dict(
        sae_id=args.sae_id,
        interventions=args.interventions,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        baseline=args.baseline,
        logprobs=args.logprobs,
        trace=args.trace,
    )
    prompt = _as_prompt(args.prompts[0], args)
    if args.json or args.baseline:
        result = client.generate(prompt, **kwargs)
        out.emit(args, result, lambda: out.side_by_side(result))
        return
    # Text as it is decoded; the summary goes to stderr so stdout is the completion alone.
    with client.stream(prompt, **kwargs) as stream:
        for item in stream:
            if isinstance(item, TokenEvent) and item.branch == "steered":
                sys.stdout.write(item.text)
                sys.stdout.flush()
        result = stream.collect()
    print()
    out.generation_details(result, args.logprobs, args.trace)


def _contrast(client: Client, args: argparse.Namespace) -> None:
    sides = []
    for side in ("positive", "negative"):
        prompts: list[PromptLike] = list(getattr(args, side))
        for path in getattr(args, f"{side}_file"):
            prompts.extend(load_prompts(path))
        if not prompts:
            raise ValueError(f"{side}: give --{side} PROMPT or --{side}-file FILE")
        sides.append(prompts)
    result = client.contrast(
        sides[0],
        sides[1],
        sae_id=args.sae_id,
        aggregation=args.aggregation,
        top_n=args.top_n,
        locations=args.locations,
        order_by=args.order_by,
        output_scores=args.output_scores,
    )
    if args.save_direction is not None and result.difference_in_means is not None:
        args.save_direction.write_text(json.dumps(result.difference_in_means) + "\n")
    out.emit(args, result, lambda: out.contrast(result))


def _feature(client: Client, args: argparse.Namespace) -> None:
    result = client.feature(
        args.feature_id,
        sae_id=args.sae_id,
        top_logits=args.top_logits,
        neighbours=args.neighbours,
        direction=args.direction,
        examples=args.examples,
        examples_page_token=args.examples_page_token,
        quantile_examples=args.quantile_examples,
    )
    out.emit(args, result, lambda: out.feature(result))


def _features(client: Client, args: argparse.Namespace) -> None:
    filters: dict[str, Any] = dict(
        sae_id=args.sae_id,
        page_size=args.page_size,
        min_density=args.min_density,
        max_density=args.max_density,
        label=args.label,
    )
    if not args.all:
        page = client.list_features(page_token=args.page_token, **filters)
        out.emit(args, page, lambda: out.feature_page(page))
        return
    summaries = client.iter_features(**filters)
    if args.json:
        for s in summaries:
            print(json.dumps(s.to_dict(), ensure_ascii=False))
        return
    listed = list(summaries)
    out.feature_page(FeaturePage(args.sae_id or "", listed, "", len(listed)))


def _search(client: Client, args: argparse.Namespace) -> None:
    result = client.search_features(args.query, sae_id=args.sae_id, top_n=args.top_n)
    out.emit(args, result, lambda: out.search(result))


def _attribute(client: Client, args: argparse.Namespace) -> None:
    target = args.target_text if args.target_text is not None else args.target_token
    result = client.attribute(
        _as_prompt(args.prompts[0], args), target=target, sae_id=args.sae_id, top_n=args.top_n
    )
    out.emit(args, result, lambda: out.attribution(result))
