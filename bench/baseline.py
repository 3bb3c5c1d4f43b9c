"""The serving benches' baselines: what a user could do by hand in one process.

- :func:`hand_activations`: a forward pass that stops after the hooked block
  (``models.run_to_hookpoints``) over length-sorted, right-padded batches, then one SAE encode
  of every real token and each token's top features — the work a feature-activations call
  does, without a service in between.
- :func:`hf_generate`: plain ``model.generate`` (greedy, KV cache), with a streamer that times
  the first token and every later one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.common import sync
from saescope.training import checkpoint, models
from saescope.training.sae import SAE


@dataclass
class Loaded:
    """The model, tokenizer and SAE the service serves, loaded in this process."""

    model: Any
    tokenizer: Any
    sae: SAE
    hookpoint: str
    device: str = "cpu"

    @classmethod
    def load(
        cls, model: str, sae_path: Path, device: str = "cpu", dtype: str = "float32"
    ) -> Loaded:
        """The model in ``dtype``, the SAE in float32 (as the service holds them), on ``device``."""
        lm, tok = models.load_model(model, device=device, dtype=getattr(torch, dtype))
        sae, meta = checkpoint.load_sae(sae_path)
        hookpoint = models.resolve_hookpoint(lm, meta.hookpoint)
        return cls(lm, tok, sae.to(device), hookpoint, device)

    def ids(self, text: str) -> list[int]:
        """Token ids as the service makes them for a plain-text prompt."""
        return list(self.tokenizer(text)["input_ids"])


@torch.inference_mode()
def hand_activations(
    ld: Loaded, ids_list: list[list[int]], *, batch_size: int = 16, top_k: int = 5
) -> int:
    """Features of every token of every prompt; returns the number of tokens processed."""
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
    pad = int(ld.tokenizer.pad_token_id or 0)
    tokens = 0
    for start in range(0, len(order), batch_size):
        batch = [ids_list[i] for i in order[start : start + batch_size]]
        t_max = max(len(p) for p in batch)
        ids = torch.full((len(batch), t_max), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), t_max), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : len(p)] = torch.tensor(p)
            mask[row, : len(p)] = 1
        ids, mask = ids.to(ld.device), mask.to(ld.device)
        resid = models.run_to_hookpoints(ld.model, ids, mask, [ld.hookpoint])[ld.hookpoint]
        x = resid[mask.bool()].float()  # (N, d_in): real tokens only
        f = ld.sae.encode(x)  # (N, d_sae)
        f.topk(top_k, dim=-1)
        tokens += len(x)
    sync(ld.device)
    return tokens


def tokenizer_for(model: str) -> Any:
    """The model's tokenizer alone (for making prompts without loading the weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.resolve_model(model))


class _Timer:
    """A ``generate`` streamer that records when each new token arrives."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Tensor) -> None:
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class GenTiming:
    tokens: int
    ttft_s: float  # prompt in → first new token out
    decode_tok_s: float  # tokens after the first, per second after the first


@torch.inference_mode()
def hf_generate(ld: Loaded, ids: list[int], max_new_tokens: int) -> GenTiming:
    """Greedy ``model.generate`` with its KV cache; EOS may end it early."""
    timer = _Timer()
    ld.model.generate(
        torch.tensor([ids], device=ld.device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=ld.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        streamer=timer,
        pad_token_id=ld.tokenizer.pad_token_id,
    )
    return timing(timer.start, timer.times)


def timing(start: float, times: list[float]) -> GenTiming:
    """Time to first token and decode rate from token arrival times."""
    if not times:
        return GenTiming(0, float("nan"), float("nan"))
    rest = times[-1] - times[0]
    rate = (len(times) - 1) / rest if len(times) > 1 and rest > 0 else float("nan")
    return GenTiming(len(times), times[0] - start, rate)
