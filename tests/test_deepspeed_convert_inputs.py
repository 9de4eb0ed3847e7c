"""`dist8 ckpt from-deepspeed` on hostile or corrupt DeepSpeed checkpoints: one line naming what, nothing written.

One 1-rank DeepSpeed run (ZeRO-2 and ZeRO-0 saves of dist8.AdamW8bit, ~5-15 s) per module; every test
mutates a copy. Covers the files DeepSpeed's zero_to_fp32 opens (FIFOs, symlinks, pickles, its own
failures), crafted segment fields (shapes, starts, list lengths), coverage by element ranges, state
values (the optimizer's own state check) and settings (the class's own construction and validation).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dist_utils import free_port  # noqa: E402

try:
    import deepspeed  # noqa: F401

    HAVE_DS = True
except Exception as exc:  # noqa: BLE001
    HAVE_DS, WHY = False, f"DeepSpeed not importable ({exc})"

pytestmark = pytest.mark.skipif(not HAVE_DS, reason="" if HAVE_DS else WHY)

TAG = "final"  # the tag tests/_ds_worker.py saves under
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
TOK = 1  # segment 1 of the ZeRO-2 save: tok.weight, 64x64, 8-bit (16 blocks of 256)
POS = 0  # segment 0: pos, 16x64, 32-bit (below min_8bit_size)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"z2": ZeRO-2 checkpoint root, "z0": ZeRO-0 one}, each 2 steps of dist8.AdamW8bit on one rank."""
    out = tmp_path_factory.mktemp("ds-saves")
    cfg = {"optimizer": {"type": "dist8.AdamW8bit", "params": {"lr": 1e-3, "block_size": 256}}}
    jobs = [{"name": f"z{stage}", "steps": 2, "save": str(out / f"z{stage}"),
             "config": dict(cfg, zero_optimization={"stage": stage})} for stage in (2, 0)]
    (out / "spec.json").write_text(json.dumps({"jobs": jobs}))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(HERE / "_ds_worker.py"), str(out / "spec.json"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"z2": out / "z2", "z0": out / "z0"}


def copy_of(saved, tmp_path, which="z2", name="ds"):
    return Path(shutil.copytree(saved[which], tmp_path / name))


def load_pt(path):
    from dist8.integrations.deepspeed_convert import deepspeed_safe_globals

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, weights_only=True)


def edit(ds, fn, name=OPTIM):
    """Apply ``fn`` to the dist8 optimizer state dict inside rank file ``name`` and save it back."""
    path = ds / TAG / name
    sd = load_pt(path)
    fn(sd["optimizer"] if name == MODEL else sd["optimizer_state_dict"]["base_optimizer_state"])
    torch.save(sd, path)


def snapshot(ds):
    return {str(p.relative_to(ds)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink()
            else os.readlink(p) if p.is_symlink() else "special" for p in sorted(ds.rglob("*"))}


def refused(ds, match, out=None):
    """from_deepspeed must raise one CheckpointError line matching ``match``, write no output and leave the
    DeepSpeed checkpoint as it was."""
    from dist8.checkpoint.format import CheckpointError
    from dist8.integrations.deepspeed_convert import from_deepspeed

    out = out or ds.parent / "out"
    before = snapshot(ds)
    with pytest.raises(CheckpointError, match=match) as info:
        from_deepspeed(ds, out)
    assert "\n" not in str(info.value), str(info.value)
    assert not out.exists()
    assert snapshot(ds) == before
    return str(info.value)


def seg(base, i):
    return base["state"][0]["segments"][i]


@pytest.fixture
def no_zero_to_fp32(monkeypatch):
    """Fail if DeepSpeed's zero_to_fp32 runs (a refusal must come before it reads anything)."""
    import deepspeed.utils.zero_to_fp32 as z

    def called(*args, **kwargs):
        raise AssertionError("zero_to_fp32 ran")

    monkeypatch.setattr(z, "get_fp32_state_dict_from_zero_checkpoint", called)


# ---- the unmodified checkpoints convert -------------------------------------------------------------------
def test_unmodified_saves_convert_and_load(saved, tmp_path):
    import dist8
    import dist8.checkpoint as ck
    import _ds_worker as W
    from dist8.integrations.deepspeed_convert import from_deepspeed

    for which in ("z2", "z0"):
        out = tmp_path / which
        from_deepspeed(saved[which], out)
        model = W.make_model(seed=3)
        opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-3)
        ck.load(out, model, opt)
        assert opt.state[model.tok.weight]["state1"].dtype == torch.uint8 and opt.state[model.pos]["step"] == 2


def test_a_parameter_split_over_two_segments_converts_as_one(saved, tmp_path):
    """Two segments covering the two halves of tok.weight (what two ranks write) convert to the same state."""
    from safetensors.torch import load_file

    from dist8.integrations.deepspeed_convert import from_deepspeed

    ds = copy_of(saved, tmp_path)

    def split(b):
        s, whole = b["state"][0], seg(b, TOK)
        halves = [{k: (v[a * 2048:(a + 1) * 2048] if k.startswith("state") else v[a * 8:(a + 1) * 8] if
                       k.startswith("absmax") else v) for k, v in whole.items()} for a in (0, 1)]
        s["segments"][TOK] = halves[0]
        for key, value in (("segments", halves[1]), ("segment_names", "tok.weight"), ("segment_starts", 2048),
                           ("segment_shapes", [64, 64])):
            s[key].append(value)

    edit(ds, split)
    from_deepspeed(saved["z2"], tmp_path / "a")
    from_deepspeed(ds, tmp_path / "b")
    a, b = (load_file(str(tmp_path / d / "optim-00000-of-00001.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- F6: the files DeepSpeed's zero_to_fp32 opens ---------------------------------------------------------
def test_a_fifo_zero_to_fp32_would_open_is_refused_without_hanging(saved, tmp_path, no_zero_to_fp32):
    ds = copy_of(saved, tmp_path)
    fifo = ds / TAG / "zz_model_states.pt"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.update(msg=refused(ds, "zz_model_states.pt is not a regular")),
                              daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # blocked opening the FIFO: open its other end so that the reader returns
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("from_deepspeed hung on a FIFO in the tag directory")
    assert "msg" in result


def test_a_symlink_out_of_the_checkpoint_is_refused_unread(saved, tmp_path, no_zero_to_fp32):
    ds = copy_of(saved, tmp_path)
    outside = tmp_path / "elsewhere.pt"
    shutil.copy(ds / TAG / MODEL, outside)
    os.symlink(outside, ds / TAG / "zz_model_states.pt")
    refused(ds, "zz_model_states.pt is a symlink")


class Marker:
    """Unpickling this creates the marker file (what a crafted checkpoint would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_in_a_file_only_zero_to_fp32_reads_is_one_line_and_never_runs(saved, tmp_path, capsys,
                                                                                no_zero_to_fp32):
    from dist8.cli import main

    ds = copy_of(saved, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"x": Marker(marker)}, ds / TAG / "zz_optim_states.pt")
    refused(ds, r"zz_optim_states.pt cannot be loaded without unpickling code \(weights_only=True\)")
    capsys.readouterr()
    assert main(["ckpt", "from-deepspeed", str(ds), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("dist8 ckpt: error: "), err
    assert "zz_optim_states.pt" in err and not marker.exists() and not (tmp_path / "out2").exists()


def test_zero_to_fp32_failures_are_one_line_naming_the_directory(saved, tmp_path):
    """zero_to_fp32's own refusals (NotImplementedError for an AutoEP checkpoint; FileNotFoundError where its
    unescaped glob of a tag path holding a glob character finds nothing) ended in a traceback."""
    from deepspeed.checkpoint.constants import (AUTOEP_LAYERS_KEY, AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY,
                                                AUTOEP_ZERO3_PARTITIONED_EXPERT_STATE_FORMAT)

    ds = copy_of(saved, tmp_path)
    sd = load_pt(ds / TAG / MODEL)
    sd[AUTOEP_LAYERS_KEY] = [{AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY: AUTOEP_ZERO3_PARTITIONED_EXPERT_STATE_FORMAT}]
    torch.save(sd, ds / TAG / MODEL)
    refused(ds, r"ds/final: DeepSpeed's zero_to_fp32 cannot read it \(NotImplementedError: zero_to_fp32 does not "
                "support AutoEP")
    ds = copy_of(saved, tmp_path, name="ds[1]")
    refused(ds, r"ds\[1\]/final: DeepSpeed's zero_to_fp32 cannot read it \(FileNotFoundError")


def test_files_zero_to_fp32_would_glob_outside_the_directory_are_refused(saved, tmp_path, no_zero_to_fp32):
    """With ``ds1`` next to ``ds[1]``, zero_to_fp32's glob of ``ds[1]/final/*`` matches ``ds1/final/*``."""
    ds = copy_of(saved, tmp_path, name="ds[1]")
    copy_of(saved, tmp_path, name="ds1")
    refused(ds, r"ds1/final/mp_rank_00_model_states.pt: DeepSpeed's zero_to_fp32 would read it from outside")


# ---- F7: crafted segment fields ---------------------------------------------------------------------------
def _set(key, value, i=TOK):
    return lambda b: b["state"][0][key].__setitem__(i, value)


@pytest.mark.parametrize("mutate, match", [
    (_set("segment_shapes", [-4]), r"segment 1: segment_shapes says parameter tok.weight has shape \[-4\]"),
    (_set("segment_shapes", [2 ** 40]), r"segment_shapes says parameter tok.weight has shape \[1099511627776\]"),
    (_set("segment_shapes", [64, "64"]), r"segment_shapes says parameter tok.weight has shape \[64, '64'\]"),
    (_set("segment_shapes", 7), "segment_shapes says parameter tok.weight has shape 7"),
    (_set("segment_starts", 100), r"segment 1: a segment of 4096 elements starting at 100 does not fit parameter "
                                  r"tok.weight \(4096 elements\)"),
    (_set("segment_starts", -1), "starting at -1 does not fit"),
    (_set("segment_starts", 0.0), "starting at 0.0 does not fit"),
    (_set("segment_starts", 2 ** 70), "starting at 1180591620717411303424 does not fit"),
    (_set("segment_names", "no.such.weight"), "segment 1: state of parameter 'no.such.weight', which the "
                                              "checkpoint's model does not have"),
    (_set("segment_names", 5), "state of parameter 5, which"),
    (lambda b: b["state"][0]["segment_names"].pop(), "segment_names, segment_starts, segment_shapes, segments "
                                                     "must be lists of one length"),
], ids=["shape-negative", "shape-huge", "shape-str", "shape-int", "start-past-end", "start-negative", "start-float",
        "start-huge", "unknown-name", "name-int", "lists-differ"])
def test_crafted_segment_fields_are_one_line_naming_the_segment(saved, tmp_path, mutate, match, no_zero_to_fp32):
    ds = copy_of(saved, tmp_path)
    edit(ds, mutate)
    msg = refused(ds, match)
    assert f"{OPTIM}: optimizer state 0" in msg


# ---- F8: coverage by ranges, state values, settings ---------------------------------------------------------
def _half(st, part):
    """Elements [part * 2048, (part + 1) * 2048) of tok.weight's 8-bit segment (8 whole blocks)."""
    return {k: (v[part * 2048:(part + 1) * 2048].clone() if k.startswith("state") else
                v[part * 8:(part + 1) * 8].clone() if k.startswith("absmax") else v) for k, v in st.items()}


def _with_second_piece(b, first, second, start=0):
    s = b["state"][0]
    s["segments"][TOK] = first
    for key, value in (("segments", second), ("segment_names", "tok.weight"), ("segment_starts", start),
                       ("segment_shapes", [64, 64])):
        s[key].append(value)


def _first_half_twice(b):
    half = _half(seg(b, TOK), 0)
    _with_second_piece(b, half, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in half.items()})


def _halves_of_two_kinds(b):
    second = {"step": 2, "state1": torch.zeros(2048), "state2": torch.zeros(2048)}  # 32-bit
    _with_second_piece(b, _half(seg(b, TOK), 0), second, start=2048)


def _seg_set(i, key, value):
    return lambda b: seg(b, i).__setitem__(key, value)


def _group_set(key, value):
    return lambda b: b["param_groups"][0].__setitem__(key, value)


def _info_set(key, value):
    return lambda b: b["dist8"].__setitem__(key, value)


@pytest.mark.parametrize("mutate, match", [
    (_first_half_twice, r"segment 30: state of parameter tok.weight for elements \[0, 2048\) overlaps the piece of "
                        r".*segment 1 \(a duplicated or mixed rank file\?\)"),
    (lambda b: b["state"][0]["segments"].__setitem__(TOK, _half(seg(b, TOK), 0)),
     r"final: parameter tok.weight has no state for elements \[2048, 4096\) of 4096 \(missing rank files\?\)"),
    (_halves_of_two_kinds, "segment 30: parameter tok.weight has 32-bit state here, 8-bit state in"),
    (lambda b: seg(b, TOK)["absmax1"].fill_(float("nan")), "segment 1: absmax1 of parameter tok.weight holds NaN"),
    (lambda b: seg(b, TOK)["absmax2"].fill_(-1.0), "absmax2 of parameter tok.weight holds NaN, inf or negative"),
    (lambda b: seg(b, POS)["state1"].fill_(float("inf")), "segment 0: state1 of parameter pos holds NaN or inf"),
    (_seg_set(TOK, "step", -5), "segment 1: step of parameter tok.weight must be a whole number"),
    (_seg_set(TOK, "step", 2.7), "step of parameter tok.weight must be a whole number"),
    (_seg_set(TOK, "step", "7"), "step of parameter tok.weight must be a whole number"),
    (lambda b: seg(b, TOK).pop("state2"), "state for parameter tok.weight has no 'state2'"),
    (_seg_set(TOK, "state3", torch.zeros(4096, dtype=torch.uint8)), r"has \['state3'\], which rule ADAM does not"),
    (lambda b: seg(b, TOK).__setitem__("absmax1", seg(b, TOK)["absmax1"][:3]), "absmax1 of parameter tok.weight has 3 "
                                                                               "entries, blocks of 256 need 16"),
    (lambda b: seg(b, POS).__setitem__("state1", seg(b, POS)["state1"].half()), "state1 of parameter pos has dtype"),
    (_seg_set(TOK, "gnorm_vec", torch.zeros(3)), "gnorm_vec of parameter tok.weight must be 100"),
    (_group_set("lr", -1.0), r"AdamW8bit refuses the saved settings: lr must be >= 0.0 \(param group 0\)"),
    (_group_set("betas", (0.9, 0.9, 0.9)), r"refuses the saved settings: betas must be a pair"),
    (_group_set("eps", float("nan")), "refuses the saved settings: eps"),
    (_info_set("rule", "LION"), "optimizer state says rule='LION', but AdamW8bit with the saved settings uses ADAM"),
    (_info_set("block_size", 512), "absmax1 of parameter tok.weight has 16 entries, blocks of 512 need 8"),
    (_info_set("block_size", 100), "AdamW8bit refuses the saved settings: block_size must be a power of two"),
    (_info_set("block_size", 256.0), "AdamW8bit refuses the saved settings: block_size must be an int"),
], ids=["overlap", "gap", "mixed-kinds", "absmax-nan", "absmax-negative", "state-inf", "step-negative",
        "step-fraction", "step-str", "state-missing", "state-extra", "absmax-short", "state-fp16", "gnorm",
        "lr-negative", "betas-three", "eps-nan", "rule-lion", "block-size-other", "block-size-bad", "block-size-float"])
def test_bad_state_and_settings_are_refused_naming_them(saved, tmp_path, mutate, match, no_zero_to_fp32):
    ds = copy_of(saved, tmp_path)
    edit(ds, mutate)
    refused(ds, match)


def test_a_duplicated_rank_file_is_refused_as_overlapping(saved, tmp_path, no_zero_to_fp32):
    ds = copy_of(saved, tmp_path)
    shutil.copy(ds / TAG / OPTIM, ds / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    refused(ds, r"zero_pp_rank_1_mp_rank_00_optim_states.pt: optimizer state 0 segment 0: state of parameter pos "
                r"for elements \[0, 1024\) overlaps")


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b["state"][1].__setitem__("state1", b["state"][1]["state1"].reshape(-1)),
     r"optimizer state 1: state1 of parameter tok.weight has shape \(4096,\), parameter has \(64, 64\)"),
    (lambda b: b["state"][1].__setitem__("step", -1), "optimizer state 1: step of parameter tok.weight must be"),
    (lambda b: b["dist8"]["names"].__setitem__(1, "pos"), r"optimizer state 1: state1 of parameter pos has shape"),
], ids=["shape", "step", "renamed"])
def test_zero_0_whole_parameter_state_is_checked_too(saved, tmp_path, mutate, match):
    ds = copy_of(saved, tmp_path, which="z0")
    edit(ds, mutate, name=MODEL)
    refused(ds, match)


@pytest.mark.parametrize("value", [torch.tensor(7.0), float("nan"), {(1, 2): 3}, "x" * 4000],
                         ids=["tensor", "nan", "dict", "long-string"])
def test_deepspeeds_step_counters_are_checked_before_anything_is_written(saved, tmp_path, value):
    """global_steps/global_samples went into the metadata's extra unchecked: a tensor, NaN or a dict failed
    after the tensor files were written (a TypeError, the half-written .out.tmp left behind), a 300 MB string
    made a checkpoint no reader accepts, with exit 0 (found by an outside probe)."""
    ds = copy_of(saved, tmp_path)
    path = ds / TAG / MODEL
    sd = load_pt(path)
    sd["global_steps"] = value
    torch.save(sd, path)
    refused(ds, rf"{MODEL}: global_steps must be a whole number in \[0, 2\*\*62\], got ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary output either


def test_a_failed_write_leaves_no_temporary_output(saved, tmp_path, monkeypatch):
    import dist8.checkpoint.format as fmt
    from dist8.integrations.deepspeed_convert import from_deepspeed

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "write_metadata", broken)
    with pytest.raises(OSError, match="disk full"):
        from_deepspeed(saved["z2"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
