"""Secrets out of logs and pages: URLs shown with their password masked."""

import re
from urllib.parse import urlsplit

MASK = "***"
_QUERY_SECRET = re.compile(r"(?i)((?:^|&)(?:password|pass|token)=)[^&]*")


def redact_url(url: str) -> str:
    """`url` with its password replaced by ***; a URL without one comes back unchanged.

    Covers `scheme://user:password@host`, `scheme://password@host` (a lone user part is
    a password to Redis) and `?password=` in the query.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        credentials, _, hostport = netloc.rpartition("@")
        user, has_password, _ = credentials.partition(":")
        shown = f"{user}:{MASK}" if has_password and user else MASK
        netloc = f"{shown}@{hostport}"
    query = _QUERY_SECRET.sub(rf"\g<1>{MASK}", query)
    shown_url = url.replace(parts.netloc, netloc, 1) if netloc != parts.netloc else url
    if query != parts.query:
        shown_url = shown_url.replace("?" + parts.query, "?" + query, 1)
    return shown_url
