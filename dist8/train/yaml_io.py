"""Reading YAML config text safely: plain data only, no aliases, bounded size and depth.

``yaml.safe_load`` builds no objects from tags, but a 521-byte alias bomb (anchors that
reference each other nine levels deep) expands into billions of entries when the config is
walked, and a self-referencing alias gives a recursive structure. dist8 configs need neither,
so aliases are refused while the document is read (before anything is expanded), as are
documents over :data:`MAX_BYTES` or nested deeper than :data:`MAX_DEPTH`. A key given twice in one
mapping is refused naming it and both lines: YAML keeps the last one silently, so a second ``train:``
section appended to change one key threw the whole first section away.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "YamlError", "load_yaml", "MAX_BYTES", "MAX_DEPTH"]

MAX_BYTES = 1 << 20  # a config is a few hundred bytes; 1 MiB leaves room and bounds the parse
MAX_DEPTH = 32


class YamlError(ValueError):
    """A YAML document dist8 refuses to read; the message names the source and line."""


class DuplicateKeyError(YamlError):
    """A mapping that gives one key twice (YAML would keep the last one without a word)."""


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and deep nesting while composing the node tree."""

    source = "<yaml>"

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlError(f"{self.source}: line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                            "are not allowed in dist8 configs; write the value out")
        depth = getattr(self, "_dist8_depth", 0)
        if depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise YamlError(f"{self.source}: line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
        self._dist8_depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._dist8_depth = depth

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        first_line: dict[Any, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges by design
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                earlier = first_line.get(key)
            except TypeError:  # an unhashable key: SafeLoader refuses it itself
                continue
            if earlier is not None:
                raise DuplicateKeyError(f"{self.source}: line {line}: duplicate key {key!r} (first on line {earlier}); "
                                        "YAML would keep only the last one: remove one or merge them")
            first_line[key] = line


# YAML 1.1 (PyYAML) reads `1e-4` as the string "1e-4": its floats need a dot (`1.0e-4`). A learning
# rate written as 3e-4 in a config or a --set is a number to everyone else (YAML 1.2, JSON, Python),
# so exponent floats without a dot are floats here too.
_PlainLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


# YAML 1.1 also reads `10:00` as base 60 (600), `010` as octal (8) and `0x10` as hex (16): a value meant as
# a time or a padded number became another number, silently. Integers and floats must be written in decimal.
_DECIMAL_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)")


def _decimal_int(loader: _PlainLoader, node: yaml.ScalarNode) -> int:
    if not _DECIMAL_INT.fullmatch(node.value):
        _refuse_non_decimal(loader, node, yaml.SafeLoader.construct_yaml_int(loader, node))
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _decimal_float(loader: _PlainLoader, node: yaml.ScalarNode) -> float:
    if ":" in node.value:
        _refuse_non_decimal(loader, node, yaml.SafeLoader.construct_yaml_float(loader, node))
    return yaml.SafeLoader.construct_yaml_float(loader, node)


def _refuse_non_decimal(loader: _PlainLoader, node: yaml.ScalarNode, value: Any) -> None:
    raise YamlError(f"{loader.source}: line {node.start_mark.line + 1}: {node.value!r} is the number {value} in "
                    "YAML 1.1 (base 60, octal or hex); write numbers in decimal, or quote a string")


_PlainLoader.add_constructor("tag:yaml.org,2002:int", _decimal_int)
_PlainLoader.add_constructor("tag:yaml.org,2002:float", _decimal_float)


def load_yaml(text: str | bytes, source: str) -> Any:
    """Parse one YAML document of plain data (``source`` names the file or option in errors)."""
    if len(text) > MAX_BYTES:
        raise YamlError(f"{source}: {len(text)} bytes; a dist8 config is at most {MAX_BYTES} bytes")
    loader = _PlainLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except YamlError:
        raise
    except yaml.YAMLError as exc:
        raise YamlError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise YamlError(f"{source}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (Python's int-from-text limit)
        raise YamlError(f"{source}: a value cannot be read: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()
