"""The proxy patch's log filter: client-caused outcomes are one INFO line, not a traceback."""

from __future__ import annotations

import logging
import sys

import pytest

from saescope.service.proxy_patch import QuietClientOutcomes


def record(msg: str, exc: BaseException | None) -> logging.LogRecord:
    """A record as ``logger.exception(msg)`` makes it inside an ``except`` for ``exc``."""
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:
            exc_info = sys.exc_info()
    return logging.LogRecord("ray.serve", logging.ERROR, "proxy.py", 1, msg, None, exc_info)


def test_an_abandoned_stream_is_an_info_line() -> None:
    r = record("Request failed due to unexpected error.", GeneratorExit())
    assert QuietClientOutcomes().filter(r)
    assert r.levelno == logging.INFO and r.exc_info is None
    assert "abandoned by its client" in r.getMessage()


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "CANCELLED"])
def test_client_status_codes_are_info_lines(code: str) -> None:
    r = record(f"Request failed with user-set gRPC status code StatusCode.{code}.", ValueError())
    assert QuietClientOutcomes().filter(r)
    assert r.levelno == logging.INFO and r.exc_info is None and code in r.getMessage()


@pytest.mark.parametrize(
    ("msg", "exc"),
    [
        ("Request failed with user-set gRPC status code StatusCode.INTERNAL.", ValueError()),
        ("Request failed due to unexpected error.", RuntimeError("boom")),
        ("Proxy starting on node x", None),
    ],
)
def test_everything_else_is_left_as_it_was(msg: str, exc: BaseException | None) -> None:
    r = record(msg, exc)
    assert QuietClientOutcomes().filter(r)
    assert r.levelno == logging.ERROR and r.getMessage() == msg
    assert (r.exc_info is None) == (exc is None)
