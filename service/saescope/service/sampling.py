"""Choosing the next token, and turning chosen tokens into streamed text with stop strings.

Sampling: greedy (argmax) when ``temperature == 0``; otherwise (logits − max) / temperature,
then top-k, then nucleus (top-p) filtering, then one draw from the request's own
``torch.Generator``. The steered and baseline branches of a request each hold a generator seeded
with the same seed (a random one when unset), so they draw the same random numbers step for step.
Subtracting the maximum first keeps every finite row finite whatever the temperature (the top
token scores 0, the rest ≤ 0, at worst −inf), so a draw never sees NaN. Non-finite logits are
the decode batcher's to catch (``generation``), before a row is sampled.

Temperatures in (0, ``MIN_TEMPERATURE``) are refused: at T = 0.01 a token whose logit is 1.04
below the best one already has probability exp(−104) < 2⁻¹⁴⁹, below float32's smallest
subnormal, so it is never drawn; lower temperatures only draw among near-ties, which is greedy
decoding up to rounding (vLLM draws the same line). Send 0 for greedy.

Log-probabilities are ``log_softmax`` of the raw logits (temperature 1, before top-k/top-p): the
model's own belief in the token, comparable between branches and across sampling settings.

Text: the completion is decoded in full after every token (``skip_special_tokens``: EOS and
template markers are in ``tokens`` but not in ``text``). A trailing U+FFFD (a multi-byte
character split across tokens) is held back until it completes, and so is any tail that could be
the start of a stop string; the last token's event carries whatever was held back. The count and
length of stop strings are limits (``Limits.max_stop_strings``, ``max_stop_string_chars``):
searching for them is work on the decode thread, which every row of the batch waits for.
"""

from __future__ import annotations

import math
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saescope.service.errors import InvalidArgument, OutOfRange
from saescope.service.types import Limits, Sampling

MIN_TEMPERATURE = 0.01
# The proto's temperature is a float32: 0.01 arrives as 0.0099999998. Compare with that.
_MIN_T_WIRE = struct.unpack("<f", struct.pack("<f", MIN_TEMPERATURE))[0]
MAX_TEMPERATURE = 10.0
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class SamplingPlan:
    """Validated sampling parameters with defaults filled in."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def plan_sampling(
    s: Sampling, limits: Limits, *, prompt_len: int, max_positions: int
) -> SamplingPlan:
    """Validate ``s`` (errors name ``sampling.*``); 0 means the proto's default where it has one."""
    n = s.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if n < 0:
        raise InvalidArgument("sampling.max_new_tokens", f"must be ≥ 1, got {n}")
    if n > limits.max_new_tokens:
        raise OutOfRange("sampling.max_new_tokens", n, limits.max_new_tokens)
    if prompt_len + n > max_positions:
        raise OutOfRange(
            "sampling.max_new_tokens", n, max_positions - prompt_len, "(prompt + new tokens)"
        )
    t = s.temperature
    if not (math.isfinite(t) and (t == 0.0 or _MIN_T_WIRE <= t <= MAX_TEMPERATURE)):
        raise InvalidArgument(
            "sampling.temperature",
            f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t:g}",
        )
    top_p = s.top_p or 1.0
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidArgument("sampling.top_p", "must be in (0, 1]")
    if s.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be ≥ 0, got {s.top_k}")
    if s.seed is not None and not 0 <= s.seed < 2**64:
        raise InvalidArgument("sampling.seed", "must be an unsigned 64-bit integer")
    _check_stop(s.stop, limits)
    return SamplingPlan(
        max_new_tokens=n,
        temperature=float(s.temperature),
        top_p=float(top_p),
        top_k=int(s.top_k),
        seed=int(s.seed) if s.seed is not None else secrets.randbits(63),
        stop=tuple(s.stop),
    )


def _check_stop(stop: tuple[str, ...], limits: Limits) -> None:
    """Stop strings: a list (count first: it is O(1)), each non-empty and not too long."""
    if isinstance(stop, str):
        raise InvalidArgument("sampling.stop", "must be a list of strings, not one string")
    if len(stop) > limits.max_stop_strings:
        raise OutOfRange("sampling.stop", len(stop), limits.max_stop_strings, "stop strings")
    for i, one in enumerate(stop):
        if not isinstance(one, str) or not one:
            raise InvalidArgument(f"sampling.stop[{i}]", "must be a non-empty string")
        if len(one) > limits.max_stop_string_chars:
            raise OutOfRange(
                f"sampling.stop[{i}]", len(one), limits.max_stop_string_chars, "characters"
            )


def make_generator(plan: SamplingPlan, device: torch.device) -> torch.Generator | None:
    """A generator seeded with the plan's seed (None for greedy: nothing is drawn)."""
    if plan.greedy:
        return None
    return torch.Generator(device=device).manual_seed(plan.seed)


def choose(logits: Tensor, plan: SamplingPlan, generator: torch.Generator | None) -> int:
    """The next token from one row's finite logits ``(V,)``."""
    if plan.greedy:
        return int(logits.argmax())
    scores = logits.float()  # (V,)
    scores = (scores - scores.max()) / plan.temperature  # ≤ 0, the best token 0: never NaN
    if 0 < plan.top_k < scores.shape[-1]:
        kth = scores.topk(plan.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if plan.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = probs.cumsum(-1) - probs >= plan.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Incremental detokenisation of a completion, with stop strings."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self.text = ""  # the completion text so far (stable; stop string removed once found)
        self._emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token_id: int) -> tuple[int, int]:
        """Add a token; return its character span in the completion text."""
        self._ids.append(token_id)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        # An incomplete multi-byte character decodes to U+FFFD: wait for the rest of it.
        stable = full.rstrip("\ufffd")
        start = min(len(self.text), len(stable))
        cut = min((i for i in (stable.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            stable, self.stopped = stable[:cut], True
        self.text = stable
        return start, max(start, len(stable))

    def take(self, final: bool) -> str:
        """Text not yet handed out; unless ``final``, keep back a possible stop-string prefix."""
        end = len(self.text)
        if not final:
            end -= self._held_back()
        out = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best, text = 0, self.text
        for stop in self._stop:
            # Candidate tails start where the stop's first character occurs, longest first.
            i = text.find(stop[0], max(len(text) - len(stop) + 1, 0))
            while i >= 0 and len(text) - i > best:
                if stop.startswith(text[i:]):
                    best = len(text) - i
                    break
                i = text.find(stop[0], i + 1)
        return best
