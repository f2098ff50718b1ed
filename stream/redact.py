"""One redaction helper for every log line, error message and printout that can hold a URL or a secret.

- :func:`redact_url`: ``scheme://user:PASSWORD@host/...?token=X`` -> ``scheme://user:***@host/...?token=***``
  (the password of the userinfo, and query parameters whose name says secret);
- :func:`redact_text`: the same for every URL inside a free text (exception messages, log lines);
- :func:`redact_settings`: a settings dict for ``lineinspect config``: URLs redacted, secret-named keys
  (``token``, ``password``, ...) replaced by ``***``;
- :class:`RedactingFormatter`: a logging formatter that passes every formatted record (tracebacks included)
  through :func:`redact_text`; ``lineinspect`` installs it for all its processes.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# query parameters and settings keys whose value is a secret
_SECRET_PARAM = re.compile(r"^(pass(word)?|passwd|pwd|(access_|auth_|api_)?token|secret|(api_?)?key|auth|"
                           r"sig(nature)?|credentials?)$", re.I)
_SECRET_KEY = re.compile(r"(^|_)(password|passwd|token|secret|api_key)$", re.I)
# scheme://userinfo@ : the userinfo runs to the LAST '@' before the path (a password may contain '@')
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#'\"<>]*)@")
_QUERY_SECRET = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&#\s'\"<>]*)")


def _userinfo(match: re.Match) -> str:
    user = match.group("userinfo").split(":", 1)[0] if ":" in match.group("userinfo") else ""
    if not user and ":" not in match.group("userinfo"):  # scheme://TOKEN@host: the whole userinfo is secret
        return f"{match.group('scheme')}{MASK}@"
    return f"{match.group('scheme')}{user}:{MASK}@"


def _query(match: re.Match) -> str:
    if _SECRET_PARAM.match(match.group("name")):
        return f"{match.group('sep')}{match.group('name')}={MASK}"
    return match.group(0)


def redact_text(text: Any) -> str:
    """``text`` (anything, str() of it) with the password of every URL and secret query values masked."""
    text = str(text)
    if "://" not in text and "=" not in text:
        return text
    out = _USERINFO.sub(_userinfo, text)
    return _QUERY_SECRET.sub(_query, out) if "://" in out else out


def redact_url(url: str) -> str:
    return redact_text(url)


def redact_settings(data: Any, key: str = "") -> Any:
    """A copy of a plain settings structure (``config.settings.to_dict``) safe to print."""
    if isinstance(data, dict):
        return {k: redact_settings(v, str(k)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_settings(v, key) for v in data]
    if isinstance(data, str):
        if data and _SECRET_KEY.search(key):
            return MASK
        return redact_text(data)
    return data


class RedactingFormatter(logging.Formatter):
    """Formats like :class:`logging.Formatter`, then masks URL passwords and secret query values."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put a :class:`RedactingFormatter` (keeping each handler's format) on the handlers of ``logger`` (root)."""
    for handler in (logger or logging.getLogger()).handlers:
        fmt = handler.formatter
        handler.setFormatter(RedactingFormatter(fmt._fmt if fmt else None, fmt.datefmt if fmt else None))
