"""Logging set-up, done once at the start of each process."""

import logging
import sys


def configure_logging(level: str = "INFO") -> None:
    """Send log records to stderr in one compact format."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
