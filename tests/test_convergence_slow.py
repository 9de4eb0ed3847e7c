"""Slow convergence check (``pytest -m slow``): 8-bit AdamW matches fp32 AdamW on a small GPT."""
import pytest

pytestmark = pytest.mark.slow


def test_8bit_adamw_matches_fp32_on_small_gpt():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from convergence import PRESETS, run_one

    from dist8.train.config import DataConfig
    from dist8.train.data import load_corpus

    preset = dict(PRESETS["quick"], steps=300)
    corpus = load_corpus(DataConfig(max_bytes=4_000_000), preset["seq_len"])
    fp32 = run_one("fp32", 0, preset, corpus)
    eight = run_one("dist8", 0, preset, corpus)
    assert not eight["diverged"]
    # Goal from issue 2: 8-bit / fp32 final validation loss <= 1.01 (one seed here: allow 1.02).
    assert eight["val_loss"] / fp32["val_loss"] <= 1.02, (eight["val_loss"], fp32["val_loss"])
