"""A service's log lines (dockercoins/logs.py): on stderr, one format, at the level asked."""

import logging
import re
from collections.abc import Iterator

import pytest

from dockercoins.logs import configure_logging


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger's handlers and level, given back after the test (pytest's own among
    them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_lines_go_to_stderr_in_one_format_at_the_level_asked(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("WARNING")
    log = logging.getLogger("rng_svc.service")
    log.info("not at WARNING")
    log.warning("rng listening on %s", "127.0.0.1:50051")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d WARNING rng_svc.service: rng listening on 127.0.0.1:50051\n",
        captured.err,
    ), captured.err
