"""Config YAML is read as plain data: aliases, alias bombs, deep nesting and huge documents are refused
with one line naming the source, before anything is expanded."""
import time
import tracemalloc

import pytest

from dist8.train.config import ConfigError, load_config
from dist8.train.yaml_io import MAX_BYTES, YamlError, load_yaml

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)])


def test_plain_config_reads():
    assert load_yaml("train: {steps: 10, lr: 1.0e-3}\nmodel:\n  n_layer: 2\n", "cfg.yaml") == {
        "train": {"steps": 10, "lr": 1e-3}, "model": {"n_layer": 2}}


def test_exponent_floats_without_a_dot_are_numbers():
    """PyYAML (YAML 1.1) reads `3e-4` as a string; a learning rate written so is a number here (YAML 1.2, JSON)."""
    assert load_yaml("lr: 3e-4\nbig: -1E+30\nunder: 1_0e2\ndotted: 1.5e-3\nn: 12", "cfg.yaml") == {
        "lr": 3e-4, "big": -1e30, "under": 1000.0, "dotted": 1.5e-3, "n": 12}
    assert load_yaml("'3e-4'", "q") == "3e-4" and load_yaml("3e-4x", "s") == "3e-4x" and load_yaml("1e", "s") == "1e"
    import yaml

    assert yaml.safe_load("1e3") == "1e3"  # only dist8's loader changed, not PyYAML's


def test_alias_bomb_is_refused_fast_and_small():
    assert len(BOMB) < 600
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(YamlError, match=r"bomb.yaml: line 2: YAML aliases \(\*a\)"):
        load_yaml(BOMB, "bomb.yaml")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 10 * 2**20


def test_self_referencing_alias_is_refused():
    with pytest.raises(YamlError, match="aliases"):
        load_yaml("a: &x [1, *x]\n", "self.yaml")


def test_deep_nesting_and_size_are_bounded():
    with pytest.raises(YamlError, match="deep.yaml: line 1: nested deeper"):
        load_yaml("[" * 5000 + "]" * 5000, "deep.yaml")
    with pytest.raises(YamlError, match="big.yaml"):
        load_yaml("x: " + "a" * (MAX_BYTES + 1), "big.yaml")


def test_syntax_errors_and_tags_are_one_line():
    with pytest.raises(YamlError) as err:
        load_yaml("a: [1, 2\n", "broken.yaml")
    assert "broken.yaml: not valid YAML" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(YamlError, match="tag.yaml"):
        load_yaml("a: !!python/object/apply:os.system ['true']\n", "tag.yaml")


def test_integer_beyond_pythons_text_limit_is_one_line(tmp_path):
    """Python refuses to read integers of more than 4300 digits (a ValueError from PyYAML, was a traceback)."""
    with pytest.raises(YamlError, match="huge.yaml: a value cannot be read: Exceeds the limit"):
        load_yaml("train:\n  steps: " + "9" * 5000 + "\n", "huge.yaml")
    config = tmp_path / "huge.yaml"
    config.write_text("train:\n  steps: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"huge.yaml.*a value cannot be read"):
        load_config(config)
    with pytest.raises(ConfigError, match=r"config key train.steps: expected integer, got str '9{59}\.\.\. \(5002 characters\)$"):
        load_config(None, ["train.steps=" + "9" * 5000])  # --set: text that is not YAML is a string
