"""Conversion by shape: frozen dataclasses ⇄ protobuf messages, field by field, by name.

Where a dataclass and a message share field names, nothing is written by hand: ``Shapes``
reads the dataclass's fields and type hints and the message's descriptor once per pair, and
converts with that plan from then on. Per field:

- scalars and repeated scalars pass through (a ``tuple[...]`` hint gets a tuple);
- enums become words of their vocabulary (``vocabulary``) and back;
- nested messages become the hinted dataclass (``list[X]``, ``X | None``) and back;
- ``map<,>`` fields become dicts;
- a field hinted ``X | None`` reads as ``None`` when the message does not have it (proto3
  ``optional`` scalars, message fields), and is left unset when ``None``;
- a message field without a default in the dataclass is required: unset, it is a
  ``WireError`` naming the field (``prompt: required``).

Messages whose shape really differs from their dataclass (a ``oneof``, packed tensors) get a
``Codec`` written by hand, registered by the message's full name; so do whole results that are
reshaped (the SDK's per-token activations). Each side (service, SDK) builds its ``Shapes`` with
its own codecs. Imports only protobuf.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from saescope.api.v1.vocabulary import BY_ENUM, WireError

T = TypeVar("T")
M = TypeVar("M", bound=Message)
Reader = Callable[[Any, str], Any]  # (wire value, field path) → domain value
Writer = Callable[[Any], Any]  # domain value → wire value


@dataclass(frozen=True)
class Codec:
    """A message type converted by hand: ``decode(message, field)`` and/or ``encode(value)``."""

    decode: Callable[[Any, str], Any] | None = None
    encode: Callable[[Any], Message] | None = None


def _optional(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(hint, False)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _element(hint: Any) -> Any:
    """The element type of ``list[X]`` / ``tuple[X, ...]``."""
    args = typing.get_args(hint)
    return args[0] if args else Any


def _missing() -> Any:
    raise WireError("", "required")


def _is_map(fd: Any) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


class Shapes:
    """Converts dataclasses to messages and back, by field name (see the module docstring).

    Descriptors are typed ``Any``: protobuf's pure-Python and upb descriptor classes differ.

    ``lenient`` decoding (a client reading responses) reads an enum number it does not know as
    the enum's 0; otherwise (a server reading requests) it is a ``WireError``.
    """

    def __init__(self, codecs: dict[str, Codec] | None = None, *, lenient: bool = False) -> None:
        self.codecs = dict(codecs or {})
        self.lenient = lenient
        self._readers: dict[tuple[type, str], Callable[[Any, str], Any]] = {}
        self._writers: dict[tuple[type, str], Callable[[Any], Message]] = {}

    # ---- wire → dataclass ---------------------------------------------------------------------
    def decode(self, message: Message, cls: type[T], field: str = "") -> T:
        """``cls`` built from ``message``; ``field`` prefixes the names in errors."""
        return self._reader(cls, message.DESCRIPTOR)(message, field)  # type: ignore[no-any-return]

    def _reader(self, cls: type, desc: Any) -> Callable[[Any, str], Any]:
        key = (cls, desc.full_name)
        read = self._readers.get(key)
        if read is None:
            read = self._readers[key] = self._compile_reader(cls, desc)
        return read

    def _compile_reader(self, cls: type, desc: Any) -> Callable[[Any, str], Any]:
        # Two readers: a generated one (one constructor call, no field paths: as fast as
        # hand-written code) and a careful one that names the field at fault. Decoding is
        # deterministic, so when the fast one fails the careful one fails too, with the name.
        hints = typing.get_type_hints(cls)
        plan: list[tuple[str, Reader]] = []
        env: dict[str, Any] = {"cls": cls, "missing": _missing}
        args = []
        for i, f in enumerate(dataclasses.fields(cls)):
            fd = desc.fields_by_name.get(f.name)
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            if fd is None:
                if not has_default:
                    raise TypeError(f"{cls.__name__}.{f.name} is not in {desc.full_name}")
                continue
            hint, required = hints[f.name], not has_default
            plan.append((f.name, self._field_reader(fd, hint, required=required)))
            args.append(f"{f.name}={self._field_source(fd, hint, required, f'r{i}', env)}")
        source = f"def fast(m):\n    return cls({', '.join(args)})\n"
        exec(source, env)  # the names are a dataclass's fields: identifiers
        fast = env["fast"]

        def careful(message: Any, path: str) -> Any:
            prefix = f"{path}." if path else ""
            return cls(**{name: r(message, prefix + name) for name, r in plan})

        def read(message: Any, path: str) -> Any:
            try:
                return fast(message)
            except WireError:
                return careful(message, path)

        return read

    def _field_source(
        self, fd: Any, hint: Any, required: bool, reader: str, env: dict[str, Any]
    ) -> str:
        """The generated reader's expression for one field (``reader``: its helper's name)."""
        value = f"m.{fd.name}"
        if _is_map(fd):
            return f"dict({value})"
        base, optional = _optional(hint)
        if fd.is_repeated:
            make = "tuple" if typing.get_origin(base) is tuple else "list"
            if fd.message_type is None and fd.enum_type is None:
                return f"{make}({value})"
            env[reader] = self._value_reader(fd, _element(base))
            return f"{make}([{reader}(x, '') for x in {value}])"
        if fd.message_type is not None or fd.enum_type is not None:
            env[reader] = self._value_reader(fd, base)
            one = f"{reader}({value}, '')"
        else:
            one = value
        if fd.has_presence and (optional or (required and fd.message_type is not None)):
            absent = "None" if optional else "missing()"
            return f"({one} if m.HasField({fd.name!r}) else {absent})"
        return one

    def _field_reader(self, fd: Any, hint: Any, *, required: bool) -> Reader:
        name = fd.name
        base, optional = _optional(hint)
        if _is_map(fd):
            return lambda m, path: dict(getattr(m, name))
        if fd.is_repeated:
            one = self._value_reader(fd, _element(base))
            make = tuple if typing.get_origin(base) is tuple else list
            if fd.message_type is None and fd.enum_type is None:
                return lambda m, path: make(getattr(m, name))
            return lambda m, path: make(
                one(x, f"{path}[{i}]") for i, x in enumerate(getattr(m, name))
            )
        one = self._value_reader(fd, base)
        if fd.has_presence and (optional or (required and fd.message_type is not None)):

            def present(m: Any, path: str) -> Any:
                if m.HasField(name):
                    return one(getattr(m, name), path)
                if optional:
                    return None
                raise WireError(path, "required")

            return present
        return lambda m, path: one(getattr(m, name), path)

    def _value_reader(self, fd: Any, hint: Any) -> Reader:
        if fd.enum_type is not None:
            vocabulary, lenient = BY_ENUM[fd.enum_type.full_name], self.lenient
            return lambda v, path: vocabulary.word(v, path, lenient=lenient)
        if fd.message_type is None:
            return lambda v, path: v
        codec = self.codecs.get(fd.message_type.full_name)
        if codec is not None and codec.decode is not None:
            return codec.decode
        if dataclasses.is_dataclass(hint):  # the usual case: compile the nested plan now
            return self._reader(hint, fd.message_type)  # type: ignore[arg-type]
        return lambda v, path: self.decode(v, hint, path)

    # ---- dataclass → wire ---------------------------------------------------------------------
    def encode(self, obj: Any, message_cls: type[M]) -> M:
        """A ``message_cls`` message holding ``obj``'s fields."""
        return self._writer(type(obj), message_cls)(obj)  # type: ignore[return-value]

    def _writer(self, cls: type, message_cls: type[Message]) -> Callable[[Any], Message]:
        key = (cls, message_cls.DESCRIPTOR.full_name)
        write = self._writers.get(key)
        if write is None:
            write = self._writers[key] = self._compile_writer(cls, message_cls)
        return write

    def _compile_writer(self, cls: type, message_cls: type[Message]) -> Callable[[Any], Message]:
        # Generated source, as ``dataclasses`` does: one constructor call with a keyword per
        # field (``None`` left out) converts large responses as fast as hand-written code.
        desc, hints = message_cls.DESCRIPTOR, typing.get_type_hints(cls)
        env: dict[str, Any] = {"M": message_cls}
        always, maybe = [], []
        for i, f in enumerate(dataclasses.fields(cls)):
            fd = desc.fields_by_name.get(f.name)
            if fd is None:
                raise TypeError(f"{cls.__name__}.{f.name} is not in {desc.full_name}")
            w = self._field_writer(fd, hints[f.name])
            if w is not None:
                env[f"w{i}"] = w
            if _optional(hints[f.name])[1]:
                value = f"w{i}(v)" if w is not None else "v"
                maybe.append(f"    v = obj.{f.name}\n    if v is not None:\n")
                maybe.append(f"        kw[{f.name!r}] = {value}\n")
            else:
                always.append(f"{f.name}=w{i}(obj.{f.name})" if w else f"{f.name}=obj.{f.name}")
        source = "def write(obj):\n    kw = {}\n" + "".join(maybe)
        source += f"    return M({', '.join([*always, '**kw'])})\n"
        exec(source, env)  # the names are a dataclass's fields: identifiers
        return env["write"]  # type: ignore[no-any-return]

    def _field_writer(self, fd: Any, hint: Any) -> Writer | None:
        """How one field's value goes on the wire; ``None``: as it is."""
        if _is_map(fd):
            return None
        base = _optional(hint)[0]
        one = self._value_writer(fd, _element(base) if fd.is_repeated else base)
        if fd.is_repeated:
            return None if one is None else (lambda v: [one(x) for x in v])
        return one

    def _value_writer(self, fd: Any, hint: Any) -> Writer | None:
        if fd.enum_type is not None:
            vocabulary, path = BY_ENUM[fd.enum_type.full_name], fd.full_name
            return lambda word: vocabulary.number(word, path)
        if fd.message_type is None:
            return None
        codec = self.codecs.get(fd.message_type.full_name)
        if codec is not None and codec.encode is not None:
            return codec.encode
        sub = GetMessageClass(fd.message_type)
        if dataclasses.is_dataclass(hint):  # the usual case: compile the nested plan now
            return self._writer(hint, sub)  # type: ignore[arg-type]
        return lambda v: self.encode(v, sub)
