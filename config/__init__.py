"""Typed settings for every lineinspect process (see :mod:`config.settings`)."""

from config.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError"]
