"""dist8's on/off environment variables, read strictly.

A switch read as "anything but empty or 0 is on" turns ``DIST8_PORTABLE=false`` into a portable
build and ``DIST8_DEEPSPEED=off`` into an installed hook, silently. :func:`env_flag` takes the usual
spellings and refuses anything else naming the variable. Imports nothing of dist8 but
:mod:`dist8.messages`, so every layer may use it.
"""
from __future__ import annotations

import os

from dist8.messages import brief

__all__ = ["env_flag", "EnvironmentSettingError"]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


class EnvironmentSettingError(ValueError):
    """An environment variable of dist8's holds a value it does not take. Never caught as a
    build failure: a typo must not turn into the reference backend with only a warning."""


def env_flag(name: str, default: bool = False) -> bool:
    """The switch ``name``: ``default`` when unset or empty, True for 1/true/yes/on, False for
    0/false/no/off (any case, surrounding blanks ignored); anything else raises
    :class:`EnvironmentSettingError` naming ``name``."""
    raw = os.environ.get(name)
    value = "" if raw is None else raw.strip().lower()
    if value == "":
        return default
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise EnvironmentSettingError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {brief(raw)}")
