"""The API's vocabularies, read from the enums of ``saescope.proto``: one word, one place.

Each enum is a vocabulary. Its words are its value names less the enum's prefix, lowercased
(``Intervention.MODE_CLAMP`` → ``"clamp"``, ``FINISH_REASON_EOS`` → ``"eos"``), in the
.proto's order. Every layer speaks these words — the service's domain types, the engine's
dispatch tables (name → function), the SDK's constructors, the CLI's flags, the Node client —
and tests check each layer against this module, so a value added to the .proto shows up as a
failing test wherever it is not handled yet.

``X_UNSPECIFIED`` (number 0) is not a word: a request that leaves it means the vocabulary's
``unspecified`` (the RPC's default, e.g. ``"max"``), or is refused when that is ``None``.
Hand-written (not generated); imports only protobuf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import EnumDescriptor

from saescope.api.v1 import saescope_pb2 as pb


class WireError(ValueError):
    """What only the wire can get wrong (an unknown enum number, an unset required message);
    ``field`` names where, e.g. ``interventions[0].mode``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Vocabulary:
    """The words of one enum and their wire numbers."""

    enum: EnumDescriptor
    words: tuple[str, ...]
    numbers: dict[str, int]
    unspecified: str | None
    """What number 0 means when a request leaves it (``None``: the field is required)."""

    @staticmethod
    def of(wrapper: Any, unspecified: str | None = None) -> Vocabulary:
        """The vocabulary of a generated enum wrapper, e.g. ``pb.Intervention.Mode``."""
        enum: EnumDescriptor = wrapper.DESCRIPTOR
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        numbers = {
            v.name.removeprefix(prefix).lower(): v.number
            for v in enum.values
            if v.name != prefix + "UNSPECIFIED"
        }
        if unspecified is not None and unspecified not in numbers:
            numbers = {unspecified: 0} | numbers  # a word of its own for 0 (finish reasons)
        return Vocabulary(enum, tuple(numbers), numbers, unspecified)

    def word(self, number: int, field: str, *, lenient: bool = False) -> str:
        """The word a wire number stands for. ``lenient`` (responses, read by clients that
        may be older than the server): an unknown number reads as 0 does."""
        for word, n in self.numbers.items():
            if n == number:
                return word
        if number == 0 and self.unspecified is not None:
            return self.unspecified
        if lenient and number != 0:
            return self.word(0, field)
        if number == 0:
            raise WireError(field, f"required ({', '.join(self.words)})")
        raise WireError(field, f"unknown value {number}")

    def number(self, word: str, field: str) -> int:
        """The wire number of a word."""
        try:
            return self.numbers[word]
        except KeyError:
            raise WireError(field, f"{word!r} is not one of {self.words}") from None


AGGREGATION = Vocabulary.of(pb.Aggregation, unspecified="max")
"""How a feature's values over a prompt's tokens become one number."""
MODE = Vocabulary.of(pb.Intervention.Mode)
"""What an intervention does to its feature (required: no default)."""
SCOPE = Vocabulary.of(pb.Intervention.Scope)
"""Where an intervention applies."""
FINISH_REASON = Vocabulary.of(pb.FinishReason, unspecified="unspecified")
"""Why a completion ended (``"unspecified"`` only from a server that did not say)."""
BRANCH = Vocabulary.of(pb.GenerateSteeredEvent.Branch)
"""Which completion a streamed token belongs to."""

ORDER_BY = Vocabulary.of(pb.SearchFeaturesByContrastRequest.OrderBy, unspecified="effect_size")
"""How a contrast search ranks its hits."""

BY_ENUM: dict[str, Vocabulary] = {
    v.enum.full_name: v for v in (AGGREGATION, MODE, SCOPE, FINISH_REASON, BRANCH, ORDER_BY)
}
"""Every vocabulary by its enum's full name (what conversion looks up)."""
