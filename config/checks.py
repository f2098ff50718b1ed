"""The checks the settings sections run on their values, and the error they raise."""

from __future__ import annotations


class SettingsError(ValueError):
    """A settings value is missing, unknown or out of range. ``key`` is the dotted path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"settings: {key}: {message}")
        self.key = key


def positive(key: str, value: float) -> None:
    if not value > 0:  # NaN fails too
        raise SettingsError(key, f"{value}: must be > 0")


def in_range(key: str, value: float, *, lo: float, hi: float) -> None:
    if not lo <= value <= hi:  # NaN fails too
        raise SettingsError(key, f"{value}: allowed {lo:g}..{hi:g}")


MAX_IDENT_LEN = 64  # camera and line ids: part of Redis keys and metric labels


def check_ident(key: str, value: str) -> str:
    """A camera or line id: 1..64 characters, none of ':', '{', '}' or whitespace (the Redis key layouts use
    ':' as separator and '{line}' as cluster hash tag). Returns ``value``; raises :class:`SettingsError`."""
    if (not value or len(value) > MAX_IDENT_LEN or any(c in value for c in ":{}")
            or any(c.isspace() for c in value)):
        raise SettingsError(key, f"{value!r}: must be 1..{MAX_IDENT_LEN} characters, without ':', braces or "
                                 "whitespace")
    return value
