"""Explanations of features by a language model behind an OpenAI-compatible endpoint.

Following delphi's explainer (EleutherAI, Paulo et al. 2024): the model is shown a feature's
top contexts with the tokens where it fires marked ``<<like this>>`` and asked for one short
phrase naming the common concept. The endpoint is any server speaking
``POST {base_url}/chat/completions`` (OpenAI, vLLM, llama.cpp, Ollama …), configured by URL;
the key, if any, is read from the environment variable ``api_key_env``. Standard library only.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Protocol

SYSTEM_PROMPT = (
    "You are a meticulous AI researcher investigating a neuron of a language model. You will "
    "see text excerpts where the neuron fires; the tokens where it fires are marked "
    "<<like this>>. Find what the marked tokens have in common, considering their context. "
    "Answer with one short phrase (at most 12 words), nothing else."
)
MARK_FRACTION = 0.25  # mark tokens above this share of the context's maximum


class ExplainerError(RuntimeError):
    """The endpoint failed or answered something that is not a chat completion."""


Context = Sequence[tuple[str, float]]
"""A context: ``(token text, the feature's value)`` per token."""


class Explainer(Protocol):
    """Explains a feature from its top contexts."""

    def explain(self, contexts: Sequence[Context]) -> str: ...


def mark(context: Context) -> str:
    """The context's text with the tokens above ``MARK_FRACTION`` of its max as ``<<tok>>``."""
    peak = max((v for _, v in context), default=0.0)
    return "".join(f"<<{t}>>" if peak > 0 and v >= MARK_FRACTION * peak else t for t, v in context)


class OpenAIExplainer:
    """An :class:`Explainer` calling ``{base_url}/chat/completions``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_examples: int = 10,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"explain_url: expected an http(s) URL, got {base_url!r}")
        if not model:
            raise ValueError("explain_model: must name the endpoint's model")
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"explain_key_env: environment variable {api_key_env} is not set")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.max_examples = timeout, max_examples

    def explain(self, contexts: Sequence[Context]) -> str:
        examples = "\n".join(
            f"Example {i + 1}: {mark(c)}" for i, c in enumerate(contexts[: self.max_examples])
        )
        body = {
            "model": self.model,
            "temperature": 0.0,
            "max_tokens": 64,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": examples},
            ],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
            raise ExplainerError(f"explainer: {self.url}: {e}") from e
        try:
            return str(answer["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError) as e:
            raise ExplainerError(f"explainer: {self.url}: not a chat completion: {answer}") from e
