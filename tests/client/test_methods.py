"""One SDK, two calling styles: ``Client`` and ``AsyncClient`` share each method's definition.

Every RPC method is written once (``saescope.client.methods``); these tests check that the two
clients expose the same methods with identical signatures and docstrings, that ``stream`` takes
exactly ``generate``'s arguments, and that what each style returns is its own (a result, an
awaitable, a stream). That they send the same bytes and decode the same results is pinned by
``tests/protos/test_wire_format.py``.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest

from saescope.client import AsyncClient, AsyncTokenStream, Client, InvalidArgument, TokenStream
from saescope.client.methods import Methods, rpc, streaming

NAMES = sorted(n for n, v in vars(Methods).items() if isinstance(v, rpc | streaming))


def test_the_method_list() -> None:
    assert NAMES == [
        "activations",
        "activations_by_sae",
        "attribute",
        "contrast",
        "feature",
        "generate",
        "info",
        "list_features",
        "search_features",
        "stream",
        "tokenize",
    ]


@pytest.mark.parametrize("name", NAMES)
def test_both_clients_have_the_same_signature_and_docs(name: str) -> None:
    sync, aio = Client("127.0.0.1:1"), AsyncClient("127.0.0.1:1")
    try:
        a, b = getattr(sync, name), getattr(aio, name)
        assert inspect.signature(a) == inspect.signature(b)
        assert a.__doc__ and a.__doc__ == b.__doc__
        assert a.__name__ == b.__name__ == name
        assert "self" not in inspect.signature(a).parameters
        assert inspect.signature(a).parameters["timeout"].default is None
    finally:
        sync.close()


def test_stream_takes_generate_arguments() -> None:
    with Client("127.0.0.1:1") as client:
        assert inspect.signature(client.stream) == inspect.signature(client.generate)
        assert "token by token" in (client.stream.__doc__ or "")


def test_each_style_returns_its_own_kind() -> None:
    """A sync stream is a ``TokenStream``; the async client's methods return coroutines (bad
    input is refused when awaited, before anything is sent) and its stream an
    ``AsyncTokenStream``."""
    with Client("127.0.0.1:1", retry=0, timeout=2) as client:
        assert isinstance(client.stream("hi"), TokenStream)

    async def run() -> None:
        async with AsyncClient("127.0.0.1:1", retry=0, timeout=2) as aio:
            assert isinstance(aio.stream("hi"), AsyncTokenStream)
            call = aio.info()
            assert inspect.isawaitable(call)
            call.close()  # type: ignore[attr-defined]
            pending = aio.activations("hi", aggregation="median")  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="aggregation: 'median' is not one of"):
                await pending

    asyncio.run(run())
