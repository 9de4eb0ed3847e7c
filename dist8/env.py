"""dist8's on/off environment variables, read strictly.

A switch read as "anything but empty or 0 is on" turns ``DIST8_PORTABLE=false`` into a portable
build and ``DIST8_DEEPSPEED=off`` into an installed hook, silently. :func:`env_flag` takes the usual
spellings and refuses anything else naming the variable. Imports nothing but the standard library
(not torch: the ``dist8`` command checks the environment before it imports any layer), so every
layer may use it.
"""
from __future__ import annotations

import os

__all__ = ["env_flag", "env_choice", "check_environment", "EnvironmentSettingError", "SWITCHES", "CHOICES"]

#: dist8's on/off environment variables (read with :func:`env_flag`).
SWITCHES = ("DIST8_PORTABLE", "DIST8_VERBOSE_BUILD", "DIST8_DEEPSPEED")
#: dist8's environment variables that name one of a few choices (read with :func:`env_choice`; the
#: kernels read DIST8_CPU_GATHER, DIST8_CPU_CODES and DIST8_CUDA_KERNEL themselves, exactly as spelled here).
CHOICES = {"DIST8_BACKEND": ("reference", "cpu", "cuda"), "DIST8_CPU_GATHER": ("hw", "scalar"),
           "DIST8_CPU_CODES": ("runs", "table"),
           "DIST8_CUDA_KERNEL": ("block", "warp")}

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def _shown(raw: str) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


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
    raise EnvironmentSettingError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {_shown(raw)}")


def env_choice(name: str) -> str | None:
    """The choice ``name`` (one of :data:`CHOICES`) names, or None when unset or empty; anything else
    raises :class:`EnvironmentSettingError` naming ``name``. DIST8_BACKEND is read in any case and
    with blanks around it; the kernels' own variables exactly."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip().lower() if name == "DIST8_BACKEND" else raw
    if value not in CHOICES[name]:
        raise EnvironmentSettingError(f"{name} must be one of {', '.join(CHOICES[name])}, got {_shown(raw)}")
    return value


def check_environment() -> None:
    """Every DIST8_* switch and choice read now, so that a launcher refuses a typo in one line
    before it starts ranks that would each fail on it."""
    for name in SWITCHES:
        env_flag(name)
    for name in CHOICES:
        env_choice(name)
