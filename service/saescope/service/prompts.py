"""Prompts → the text the model sees → token ids with character offsets.

A plain-text prompt is tokenised with the tokenizer's default special tokens (SmolLM2 adds no
BOS; a Llama-2 tokenizer would). A chat is rendered with the model's chat template
(``add_generation_prompt`` per request) and the rendered text is tokenised *without* adding
special tokens, since the template writes its own. Offsets come from the fast tokenizer's offset
mapping, so ``Token.start/end`` index the rendered text (made disjoint: a character split over
several tokens belongs to the first); ``special`` marks the tokenizer's
special ids (BOS, EOS, template markers).

Validation errors name the field as the proto does: ``prompts[2].chat.messages[0].role``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saescope.service.errors import InvalidArgument, OutOfRange
from saescope.service.runtime import ModelRuntime
from saescope.service.types import Prompt, Token, Tokenized


@dataclass(frozen=True)
class Encoded:
    """A tokenised prompt: the ids the model reads and their description."""

    ids: list[int]
    tokenized: Tokenized

    @property
    def tokens(self) -> list[Token]:
        return self.tokenized.tokens

    def special_mask(self) -> list[bool]:
        return [t.special for t in self.tokenized.tokens]


def render(tokenizer: Any, prompt: Prompt, field: str) -> tuple[str, bool]:
    """The prompt's text as the model sees it, and whether the tokenizer should add specials."""
    if prompt.text is not None and prompt.chat is not None:
        raise InvalidArgument(field, "set either text or chat, not both")
    if prompt.chat is None:
        if prompt.text is None:
            raise InvalidArgument(field, "set either text or chat")
        if not isinstance(prompt.text, str):
            raise InvalidArgument(f"{field}.text", "must be a string")
        return prompt.text, True
    messages = _messages(prompt, field)
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument(f"{field}.chat", "this model has no chat template; send text")
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt.add_generation_prompt
        )
    except Exception as e:  # jinja raises on chats a template refuses (e.g. role order)
        raise InvalidArgument(f"{field}.chat", f"the chat template rejected it: {e}") from None
    return str(text), False


def _messages(prompt: Prompt, field: str) -> list[dict[str, str]]:
    assert prompt.chat is not None
    if len(prompt.chat) == 0:
        raise InvalidArgument(f"{field}.chat.messages", "a chat needs at least one message")
    out = []
    for i, m in enumerate(prompt.chat):
        where = f"{field}.chat.messages[{i}]"
        if not isinstance(m.role, str) or not m.role.strip():
            raise InvalidArgument(f"{where}.role", "must be a non-empty string")
        if not isinstance(m.content, str):
            raise InvalidArgument(f"{where}.content", "must be a string")
        out.append({"role": m.role, "content": m.content})
    return out


def encode(rt: ModelRuntime, prompt: Prompt, field: str, *, max_tokens: int) -> Encoded:
    """Render and tokenise ``prompt``; InvalidArgument when empty, OutOfRange when too long."""
    text, add_special = render(rt.tokenizer, prompt, field)
    enc = rt.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    if not ids:
        raise InvalidArgument(field, "the prompt has no tokens")
    if len(ids) > max_tokens:
        raise OutOfRange(field, len(ids), max_tokens, "tokens")
    offsets = _disjoint(enc.get("offset_mapping") or [(-1, -1)] * len(ids))
    tokens = [
        Token(
            id=tid,
            text=rt.token_text(tid),
            start=int(start) if start is not None else -1,
            end=int(end) if end is not None else -1,
            special=tid in rt.special_ids,
        )
        for tid, (start, end) in zip(ids, offsets, strict=True)
    ]
    return Encoded(ids=ids, tokenized=Tokenized(text=text, tokens=tokens))


def _disjoint(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans that never overlap: a character split over several byte-level tokens (``ö`` as two
    tokens, both with the span of ``ö``) belongs to the first; the rest get an empty span at its
    end. So the spans of a prompt's tokens tile its text, each character counted once."""
    out: list[tuple[int, int]] = []
    done = 0  # end of the last span handed out
    for start, end in offsets:
        if start is None or end is None or start < 0:
            out.append((-1, -1))
            continue
        start = max(start, done)
        end = max(end, start)
        out.append((start, end))
        done = end
    return out


def encode_many(
    rt: ModelRuntime, prompts: list[Prompt], field: str, *, max_prompts: int, max_tokens: int
) -> list[Encoded]:
    """Encode a repeated-prompt field (``prompts``, ``positive``): 1 ≤ count ≤ ``max_prompts``."""
    if not prompts:
        raise InvalidArgument(field, "at least one prompt is required")
    if len(prompts) > max_prompts:
        raise OutOfRange(field, len(prompts), max_prompts, "prompts")
    return [encode(rt, p, f"{field}[{i}]", max_tokens=max_tokens) for i, p in enumerate(prompts)]
