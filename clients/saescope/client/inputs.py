"""What callers pass in: prompts (text or chats) and feature interventions for steering.

A prompt is a ``str``, a ``Chat``, or a chat written as a list of ``{"role": ..., "content": ...}``
dicts / ``ChatMessage`` objects. Interventions are built with the helpers::

    clamp(1234, 8.0)                 # set feature 1234 to 8.0 at every position
    add(77, 2.5, scope="generated")  # add 2.5 on generated tokens only
    multiply(5, 0.5)                 # halve feature 5
    ablate(42, scope="prompt")       # zero feature 42 over the prompt
    direction(vector, 4.0)           # add 4 × a steering vector (d_in floats), no feature
    clamp(1234, 0.0).when(feature=77, above=2.0)   # only where feature 77 is above 2
    add(5, 3.0).when(direction=vector, above=1.5)  # only where x · v/‖v‖ is above 1.5

Steering keeps the SAE's error term: ``x' = x + dec(f') − dec(f)`` (see the API docs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

from saescope.client.errors import InvalidArgument

Aggregation: TypeAlias = Literal["max", "mean", "sum"]
InterventionMode: TypeAlias = Literal["clamp", "add", "multiply", "ablate", "direction"]
Scope: TypeAlias = Literal["all", "prompt", "generated"]
OrderBy: TypeAlias = Literal["effect_size", "output_score"]

AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
MODES: tuple[str, ...] = get_args(InterventionMode)
SCOPES: tuple[str, ...] = get_args(Scope)
ORDERS: tuple[str, ...] = get_args(OrderBy)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a chat."""

    role: str
    """``"system"``, ``"user"`` or ``"assistant"`` (whatever the model's template knows)."""
    content: str


@dataclass(frozen=True, slots=True)
class Chat:
    """A chat, rendered by the service with the model's chat template."""

    messages: tuple[ChatMessage, ...]
    add_generation_prompt: bool | None = None
    """Append the assistant header. ``None``: the call decides — on for ``generate``/``stream``
    (the model should answer), off for ``tokenize``/``activations``/``contrast``."""

    def __post_init__(self) -> None:
        # accept dicts and lists too: Chat([{"role": "user", "content": "Hi"}])
        messages = tuple(_message(m, i) for i, m in enumerate(self.messages))
        object.__setattr__(self, "messages", messages)

    @classmethod
    def of(
        cls,
        messages: Sequence[ChatMessage | Mapping[str, str]],
        add_generation_prompt: bool | None = None,
    ) -> Chat:
        """A chat from ``ChatMessage`` objects or ``{"role", "content"}`` dicts."""
        return cls(tuple(messages), add_generation_prompt)  # type: ignore[arg-type]


ChatLike: TypeAlias = Chat | Sequence[ChatMessage | Mapping[str, str]]
PromptLike: TypeAlias = str | ChatLike
"""A prompt: plain text, a ``Chat``, or a list of chat messages (dicts or ``ChatMessage``)."""


@dataclass(frozen=True, slots=True)
class Condition:
    """Where a conditional intervention applies: positions where ``feature``'s value, or the
    residual stream's projection on ``direction`` (``x · v / ‖v‖``), is above ``threshold``;
    read at the SAE's hookpoint before any edit. Build it with ``Intervention.when``."""

    feature: int | None = None
    direction: tuple[float, ...] | None = None
    """A vector (d_in floats), not zero."""
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if (self.feature is None) == (self.direction is None):
            raise InvalidArgument(
                "INVALID_ARGUMENT",
                "interventions.condition: give exactly one of feature and direction",
            )
        if self.direction is not None:  # any sequence of numbers (a list, a numpy array)
            object.__setattr__(self, "direction", tuple(float(x) for x in self.direction))


@dataclass(frozen=True, slots=True)
class Intervention:
    """One edit during generation; build it with ``clamp``/``add``/``multiply``/``ablate``
    (a feature) or ``direction`` (a vector), or from a dict ``{"feature": 3, "mode": "clamp",
    "value": 5.0}``."""

    feature: int
    """The feature edited (ignored by ``direction``)."""
    mode: InterventionMode
    value: float = 0.0
    """The clamp target, the amount added, the factor, or the vector's multiplier; ignored by
    ``ablate``."""
    scope: Scope = "all"
    """``"all"`` positions, the ``"prompt"`` only, or the ``"generated"`` tokens only."""
    direction: tuple[float, ...] | None = None
    """The vector of a ``direction`` edit (d_in floats), added as ``value × direction``."""
    condition: Condition | None = None
    """Apply only where this holds (see ``when``); ``None``: at every position in scope."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(
                "INVALID_ARGUMENT", f"interventions.mode: {self.mode!r} is not one of {MODES}"
            )
        if self.scope not in SCOPES:
            raise InvalidArgument(
                "INVALID_ARGUMENT", f"interventions.scope: {self.scope!r} is not one of {SCOPES}"
            )
        if (self.direction is None) == (self.mode == "direction"):
            which = "requires" if self.direction is None else "is only for"
            raise InvalidArgument(
                "INVALID_ARGUMENT", f"interventions.direction: {which} mode 'direction'"
            )
        if self.direction is not None:  # any sequence of numbers (a list, a numpy array)
            object.__setattr__(self, "direction", tuple(float(x) for x in self.direction))
        if isinstance(self.condition, Mapping):  # from a dict, as the intervention may be
            object.__setattr__(self, "condition", Condition(**self.condition))

    def when(
        self,
        feature: int | None = None,
        *,
        direction: Sequence[float] | None = None,
        above: float = 0.0,
    ) -> Intervention:
        """This edit, applied only at positions where ``feature``'s value (model units), or the
        residual's projection on ``direction`` (``x · v / ‖v‖``), is above ``above`` — read
        before any edit, so edits never trigger each other. The result's ``fired`` (and each
        streamed token's) says where it applied."""
        vector = None if direction is None else tuple(direction)
        return dataclasses.replace(self, condition=Condition(feature, vector, above))


def clamp(feature: int, value: float, scope: Scope = "all") -> Intervention:
    """Set ``feature`` to ``value`` (in model units, like the activations the service reports)."""
    return Intervention(feature, "clamp", value, scope)


def add(feature: int, value: float, scope: Scope = "all") -> Intervention:
    """Add ``value`` to ``feature``."""
    return Intervention(feature, "add", value, scope)


def multiply(feature: int, factor: float, scope: Scope = "all") -> Intervention:
    """Multiply ``feature`` by ``factor``."""
    return Intervention(feature, "multiply", factor, scope)


def ablate(feature: int, scope: Scope = "all") -> Intervention:
    """Set ``feature`` to 0."""
    return Intervention(feature, "ablate", 0.0, scope)


def direction(vector: Sequence[float], value: float = 1.0, scope: Scope = "all") -> Intervention:
    """Add ``value`` × ``vector`` (d_in floats, e.g. a contrast's ``difference_in_means``) to
    the residual stream at the SAE's hookpoint: a steering vector, not a feature."""
    return Intervention(0, "direction", value, scope, tuple(vector))


InterventionLike: TypeAlias = Intervention | Mapping[str, object]


def as_intervention(item: InterventionLike) -> Intervention:
    """An ``Intervention`` from itself or a dict with its fields."""
    if isinstance(item, Intervention):
        return item
    if isinstance(item, Mapping):
        try:
            return Intervention(**item)  # type: ignore[arg-type]
        except TypeError as e:
            raise InvalidArgument("INVALID_ARGUMENT", f"interventions: {e}") from None
    raise InvalidArgument(
        "INVALID_ARGUMENT", f"interventions: expected an Intervention or a dict, got {item!r}"
    )


def is_chat(value: object) -> bool:
    """Whether ``value`` is one chat (rather than a list of prompts)."""
    if isinstance(value, Chat):
        return True
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        return False
    return all(isinstance(m, ChatMessage | Mapping) for m in value)


def as_chat(value: ChatLike) -> Chat:
    """A ``Chat`` from itself or a list of messages."""
    return value if isinstance(value, Chat) else Chat.of(value)


def _message(item: ChatMessage | Mapping[str, str], index: int) -> ChatMessage:
    if isinstance(item, ChatMessage):
        return item
    try:
        return ChatMessage(role=str(item["role"]), content=str(item["content"]))
    except (KeyError, TypeError):
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            f"chat.messages[{index}]: expected {{'role': ..., 'content': ...}}, got {item!r}",
        ) from None
