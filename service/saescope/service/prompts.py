"""Prompts → the text the model sees → token ids with character offsets.

A plain-text prompt is tokenised with the tokenizer's default special tokens (SmolLM2 adds no
BOS; a Llama-2 tokenizer would). A chat is rendered with the model's chat template
(``add_generation_prompt`` per request) and the rendered text is tokenised *without* adding
special tokens, since the template writes its own. Offsets come from the fast tokenizer's offset
mapping, so ``Token.start/end`` index the rendered text (made disjoint: a character split over
several tokens belongs to the first); ``special`` marks the tokenizer's
special ids (BOS, EOS, template markers).

Validation errors name the field as the proto does: ``prompts[2].chat.messages[0].role``.

Size before work. Tokenising costs about a microsecond per character, so a prompt is measured
before it is tokenised: no token covers more than ``token_chars(tokenizer)`` characters of the
text, hence a text longer than ``max_tokens × token_chars`` has more than ``max_tokens`` tokens
and is refused (OUT_OF_RANGE) without tokenising it — a chat by its messages' characters before
the template renders it, then by the rendered text. A call's prompts share a token budget
(``Limits.max_tokens_per_call``): ``encode_many`` stops at the prompt that exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from saescope.service.errors import InvalidArgument, OutOfRange
from saescope.service.runtime import ModelRuntime
from saescope.service.types import Prompt, Token, Tokenization


@dataclass(frozen=True)
class Encoded:
    """A tokenised prompt: the ids the model reads and their description."""

    ids: list[int]
    tokenized: Tokenization

    @property
    def tokens(self) -> list[Token]:
        return self.tokenized.tokens

    def special_mask(self) -> list[bool]:
        return [t.special for t in self.tokenized.tokens]


class PromptLimits(NamedTuple):
    """How large prompts may be: per prompt, and all of one call's together."""

    max_tokens: int  # tokens of one rendered prompt
    max_chars: int  # characters of one prompt: more cannot fit in ``max_tokens`` tokens
    max_call_tokens: int  # tokens of all the prompts of one call

    @staticmethod
    def of(tokenizer: Any, max_tokens: int, max_call_tokens: int) -> PromptLimits:
        return PromptLimits(max_tokens, max_tokens * token_chars(tokenizer), max_call_tokens)


def token_chars(tokenizer: Any) -> int:
    """The most characters of a text one token can cover (scans the vocabulary once).

    A token covers at most as many characters as its bytes, which its vocabulary string counts
    for byte-level BPE (``Ġhello``) and its decoded text bounds otherwise; SentencePiece's ``▁``
    is a character of the text too. A normalizer could shorten the text before it is split
    (NFKC composes characters), so then the bound is doubled.
    """
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    longest = max(
        max(len(tokenizer.decode([i])), len(piece or "")) for i, piece in enumerate(pieces)
    )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizes = backend is None or backend.normalizer is not None
    return max(1, longest) * (2 if normalizes else 1)


def check_size(prompt: Prompt, field: str, limits: PromptLimits) -> None:
    """Refuse a prompt whose text alone shows it is too long (before rendering or tokenising)."""
    if isinstance(prompt.text, str) and len(prompt.text) > limits.max_chars:
        raise OutOfRange(f"{field}.text", len(prompt.text), limits.max_chars, "characters")
    if prompt.chat is None:
        return
    if len(prompt.chat) > limits.max_tokens:
        raise OutOfRange(f"{field}.chat.messages", len(prompt.chat), limits.max_tokens, "messages")
    # The template renders every message's content.
    chars = sum(len(m.content) for m in prompt.chat if isinstance(m.content, str))
    if chars > limits.max_chars:
        raise OutOfRange(f"{field}.chat", chars, limits.max_chars, "characters of content")


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


def encode(rt: ModelRuntime, prompt: Prompt, field: str, limits: PromptLimits) -> Encoded:
    """Render and tokenise ``prompt``; InvalidArgument when empty, OutOfRange when too long."""
    check_size(prompt, field, limits)
    text, add_special = render(rt.tokenizer, prompt, field)
    if len(text) > limits.max_chars:  # the template's own text made it too long
        raise OutOfRange(field, len(text), limits.max_chars, "characters once rendered")
    enc = rt.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    if not ids:
        raise InvalidArgument(field, "the prompt has no tokens")
    if len(ids) > limits.max_tokens:
        raise OutOfRange(field, len(ids), limits.max_tokens, "tokens")
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
    return Encoded(ids=ids, tokenized=Tokenization(text=text, tokens=tokens))


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
    rt: ModelRuntime,
    prompts: list[Prompt],
    field: str,
    limits: PromptLimits,
    *,
    max_prompts: int,
    spent: int = 0,
) -> list[Encoded]:
    """Encode a repeated-prompt field (``prompts``, ``positive``): 1 ≤ count ≤ ``max_prompts``.

    ``spent``: tokens the call's earlier fields used (contrast: ``positive`` before
    ``negative``); together they stay within ``limits.max_call_tokens``, and encoding stops at
    the first prompt over it.
    """
    if not prompts:
        raise InvalidArgument(field, "at least one prompt is required")
    if len(prompts) > max_prompts:
        raise OutOfRange(field, len(prompts), max_prompts, "prompts")
    out = []
    for i, p in enumerate(prompts):
        enc = encode(rt, p, f"{field}[{i}]", limits)
        spent += len(enc.ids)
        if spent > limits.max_call_tokens:
            raise OutOfRange(
                field, spent, limits.max_call_tokens, f"tokens in the call up to {field}[{i}]"
            )
        out.append(enc)
    return out
