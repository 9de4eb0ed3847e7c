"""Checkpoints: save on N ranks, load on M (exact), atomic saves, corruption errors, collectives, converters."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dist8
import dist8.checkpoint as ck
from ckpt_utils import (KW, SHAPES, assert_same, make_model, resume_sharded, save_sharded, snapshot, train,
                        uninterrupted_sharded)
from dist8.checkpoint.convert import export_fp32_adam, from_bitsandbytes, to_bitsandbytes
from dist8.shard import ShardedOptimizer
from dist8.shard.collectives import all_gather_state, fp32_state_bytes, gather_state, scatter_state
from dist_utils import run_ranks



def test_save_on_4_load_on_1_2_3_4_is_exact(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(save_sharded, 4, path, 10, {}, tmp_path=tmp_path)
    meta = json.loads(open(os.path.join(path, "metadata.json")).read())
    assert meta["world_size"] == 4 and len([f for f in meta["files"] if f.startswith("optim-")]) == 4
    reference = None
    for m in (1, 2, 3, 4):
        resumed = run_ranks(resume_sharded, m, path, 10, {}, tmp_path=tmp_path)[0]
        uninterrupted = run_ranks(uninterrupted_sharded, m, 20, {}, tmp_path=tmp_path)[0]
        assert_same(resumed, uninterrupted)
        if reference is not None:
            assert_same(resumed, reference)
        reference = resumed
    # and into the plain optimizer on one process
    model = make_model(seed=5)
    opt = dist8.AdamW8bit(model.named_parameters(), **KW)
    ck.load(path, model, opt)
    train(model, opt, 10, 10)
    assert_same(snapshot(model, opt), reference)


def _collectives(rank, world_size):
    model = make_model()
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, **KW)
    train(model, opt, 3, 0)
    with allocations() as gathered_bytes:
        full, sent = gather_state(opt, dst=0)
    everywhere, _ = all_gather_state(opt)
    # predicted bytes rank r sends to rank 0: its pieces' codes (2 per element) + absmax (2 fp32 per block)
    mine = sum(p.numel * 2 + ((p.stop - p.start + 255) // 256) * 8 for p in opt.pieces) + 8 * 0
    before = {k: {kk: vv.clone() for kk, vv in v.items() if torch.is_tensor(vv)} for k, v in opt.shard_state().items()}
    for st in opt.shard_state().values():  # wipe, then restore by scatter
        for v in st.values():
            if torch.is_tensor(v):
                v.zero_()
    with allocations() as scattered_bytes:
        scatter_state(opt, full, src=0)
    after = opt.shard_state()
    restored = all(torch.equal(before[k][kk], after[k][kk].reshape(before[k][kk].shape)) for k in before for kk in before[k])
    own_state = sum(v.numel() * v.element_size() for st in after.values() for v in st.values() if torch.is_tensor(v))
    return {"full": full, "sent": sent, "predicted": mine, "everywhere": everywhere, "restored": restored,
            "fp32": fp32_state_bytes(opt), "gather_alloc": gathered_bytes[0], "scatter_alloc": scattered_bytes[0],
            "own_state": own_state}


class allocations:
    """Bytes allocated (summed, an upper bound of the peak) by tensor ops inside the block, via the profiler."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.result = [0]
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self.result

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.result[0] = sum(max(0, e.self_cpu_memory_usage) for e in self.prof.events())
        return False


def test_collectives_move_codes_and_absmax_exactly(tmp_path):
    results = run_ranks(_collectives, 2, tmp_path=tmp_path)
    assert results[1]["sent"] == results[1]["predicted"]
    assert results[0]["sent"] == 0 and results[1]["full"] is None
    assert all(r["restored"] for r in results)
    # Memory: a rank that only sends stages nothing (pieces go out as views, no copies);
    # receivers allocate exactly what they receive (the destination's full state, or their own pieces).
    # (measured here: ~3 KiB of pickled bookkeeping for this model, against ~7 KiB of state sent).
    assert results[1]["gather_alloc"] < 4096, results[1]["gather_alloc"]
    for r in results:
        assert r["scatter_alloc"] <= r["own_state"] + 4096, (r["scatter_alloc"], r["own_state"])
    # the whole state on the wire vs fp32 state: (2 + 8/256) / 8 plus the tiny-parameter overhead
    total = sum(r["predicted"] for r in results)
    assert total / results[0]["fp32"] < 0.26
    for i, st in results[0]["full"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                assert v.dtype in (torch.uint8, torch.float32)
                assert torch.equal(v, results[1]["everywhere"][i][k])


def _tiny_save(tmp_path):
    model = make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **KW)
    train(model, opt, 2, 0)
    return model, opt, ck.save(str(tmp_path / "c"), model, opt, step=2)


def test_corruptions_are_rejected_naming_the_file(tmp_path):
    model, opt, path = _tiny_save(tmp_path)
    optim_file = os.path.join(path, "optim-00000-of-00001.safetensors")
    data = bytearray(open(optim_file, "rb").read())
    data[-5] ^= 0xFF
    open(optim_file, "wb").write(bytes(data))
    with pytest.raises(ck.CheckpointError, match="optim-00000-of-00001.safetensors.*sha256"):
        ck.load(path, model, opt)
    open(optim_file, "wb").write(bytes(data[:-100]))
    with pytest.raises(ck.CheckpointError, match="optim-00000-of-00001.safetensors.*bytes"):
        ck.load(path, model, opt)
    os.remove(optim_file)
    with pytest.raises(ck.CheckpointError, match="optim-00000-of-00001.safetensors is missing"):
        ck.load(path, model, opt)
    os.remove(os.path.join(path, "metadata.json"))
    with pytest.raises(ck.CheckpointError, match="metadata.json is missing"):
        ck.load(path, model, opt)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load(str(tmp_path / "nope"), model, opt)
    (tmp_path / "a_file").write_text("not a checkpoint")
    with pytest.raises(ck.CheckpointError, match="a_file is a file, not a checkpoint directory"):
        ck.load(str(tmp_path / "a_file"), model, opt)


def test_mismatches_are_rejected_naming_the_parameter(tmp_path):
    model, opt, path = _tiny_save(tmp_path)
    other = torch.nn.Module()
    other.register_parameter("w1", torch.nn.Parameter(torch.zeros(33, 100)))
    other.register_parameter("extra", torch.nn.Parameter(torch.zeros(10)))
    other.register_parameter("b1", torch.nn.Parameter(torch.zeros(34)))
    with pytest.raises(ck.CheckpointError, match="extra.*not in the checkpoint"):
        ck.load(path, None, dist8.AdamW8bit(other.named_parameters(), **KW))
    with pytest.raises(ck.CheckpointError, match=r"b1 has shape \(33,\)"):
        ck.load(path, None, dist8.AdamW8bit(other.named_parameters(), **KW))
    with pytest.raises(ck.CheckpointError, match="block_size=256"):
        ck.load(path, model, dist8.AdamW8bit(model.named_parameters(), block_size=512, **KW))
    with pytest.raises(ck.CheckpointError, match="Lion8bit"):
        ck.load(path, model, dist8.Lion8bit(model.named_parameters()))
    lenient = dist8.AdamW8bit(other.named_parameters(), **KW)
    with pytest.warns(UserWarning, match="skipped"):
        ck.load(path, None, lenient, strict=False)
    assert lenient.state[other.w1]["state1"].dtype == torch.uint8
    assert not lenient.state[other.b1]


def test_keep_last_rotation_and_latest(tmp_path):
    model = make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **KW)
    for step in range(1, 5):
        train(model, opt, 1, step)
        ck.save(tmp_path / "run", model, opt, step=step, keep_last=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000003", "step-00000004"]
    assert ck.latest(tmp_path / "run").endswith("step-00000004")
    assert ck.latest(tmp_path / "empty") is None
    with pytest.raises(ck.CheckpointError, match=r"run is a checkpoint root .*: load dist8\.checkpoint\.latest\(root\), "
                                                 r"here .*step-00000004$"):
        ck.load(tmp_path / "run", model, opt)  # the root is not a checkpoint; the error says which one to load
    # a step that is not a whole number >= 0 is refused before anything is written; integer
    # numpy and torch scalars name the directory like ints
    for bad in (float("nan"), -1, 2.5, "5", True, torch.tensor(5.0)):
        with pytest.raises(ValueError, match=r"^save\(step=\.\.\.\) must be an integer >= 0, got "):
            ck.save(tmp_path / "run", model, opt, step=bad, keep_last=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000003", "step-00000004"]
    ck.save(tmp_path / "run", model, opt, step=torch.tensor(5), keep_last=2)
    ck.save(tmp_path / "run", model, opt, step=np.int64(6), keep_last=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000005", "step-00000006"]
    assert ck.read_metadata(ck.latest(tmp_path / "run"))["step"] == 6
    # keep_last likewise, before anything is written (2.5 and "all" failed after writing, while rotating;
    # True kept one)
    for bad in (0, -1, 2.5, "all", True, float("nan")):
        with pytest.raises(ValueError, match=r"^keep_last must be an integer >= 1, got "):
            ck.save(tmp_path / "run", model, opt, step=7, keep_last=bad)
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000005", "step-00000006"]
    # extra must come back as it went in: refused before anything is written (inf/NaN and tensors
    # failed after the tensor files were written; an int key came back as a string)
    for bad, match in (({"best": float("inf")}, "must be JSON data"), ({"t": torch.tensor(1.0)}, "must be JSON data"),
                       ({3: "epoch"}, "key 3 is not a string"), ({"a": [{"b": {4: 1}}]}, "key 4 under 'b' is not"),
                       ([1, 2], "must be a dict")):
        with pytest.raises(ValueError, match=r"^save\(extra=\.\.\.\)" + ".*" + match):
            ck.save(tmp_path / "run", model, opt, step=7, keep_last=2, extra=bad)
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000005", "step-00000006"]
    for bad in (None, "yes", torch.tensor(True)):  # None loaded non-strict, silently
        with pytest.raises(ValueError, match="strict must be True or False"):
            ck.load(ck.latest(tmp_path / "run"), model, opt, strict=bad)
        with pytest.raises(ValueError, match="verify must be True or False"):
            ck.load(ck.latest(tmp_path / "run"), model, opt, verify=bad)
        with pytest.raises(ValueError, match="strict must be True or False"):
            ck.load_fp32_weights(model.state_dict(), model, strict=bad)



def test_rotation_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A save killed while deleting an old checkpoint (rmtree removed the tensors, not yet
    metadata.json) must not leave a step-* directory that latest() would pick after a restart."""
    import shutil

    import dist8.checkpoint.io as ckio

    model = make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **KW)
    for step in (1, 2):
        train(model, opt, 1, step)
        ck.save(tmp_path / "run", model, opt, step=step, keep_last=2)
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        for f in Path(path).glob("*.safetensors"):
            f.unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckio.shutil, "rmtree", killed_rmtree)
    train(model, opt, 1, 3)
    with pytest.raises(KeyboardInterrupt):
        ck.save(tmp_path / "run", model, opt, step=3, keep_last=2)
    monkeypatch.setattr(ckio.shutil, "rmtree", real_rmtree)
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-00000002", "step-00000003"]
    (tmp_path / "run" / ckio.LATEST).unlink()  # a restart that scans: only complete checkpoints are seen
    fresh = make_model()
    ck.load(ck.latest(tmp_path / "run"), fresh, dist8.AdamW8bit(fresh.named_parameters(), **KW))
    train(model, opt, 1, 4)
    ck.save(tmp_path / "run", model, opt, step=4, keep_last=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000003", "step-00000004"]  # trash cleared


SAVER = r"""
import os, sys, torch, dist8, dist8.checkpoint as ck
model = torch.nn.Linear(2000, 2000)
opt = dist8.AdamW8bit(model.parameters(), min_8bit_size=0)
# resumed from the killed attempt's newest checkpoint, as a restarted job is (a save of a lower step
# than keep_last newer ones is refused: its own rotation would delete it)
found = ck.latest(sys.argv[1]) if os.path.isdir(sys.argv[1]) else None
if found:
    ck.load(found, model, opt)
first = ck.read_metadata(found)["step"] + 1 if found else 1
for step in range(first, first + 1000):
    model.weight.grad = torch.full_like(model.weight, float(step)); model.bias.grad = torch.ones(2000)
    opt.step()
    ck.save(sys.argv[1], model, opt, step=step, keep_last=2)
    ck.save(sys.argv[2], model, opt, step=step)
    print(step - first + 1, flush=True)
"""


def test_save_killed_at_random_points_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    rng = random.Random(0)
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "rot"), str(tmp_path / "fixed")],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # at least one complete save of each kind
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = torch.nn.Linear(2000, 2000)
        opt = dist8.AdamW8bit(model.parameters(), min_8bit_size=0)
        latest = ck.latest(tmp_path / "rot")
        ck.load(latest, model, opt)
        step = opt.state[model.weight]["step"]
        assert ck.read_metadata(latest)["step"] == step
        with pytest.warns(UserWarning) if not (tmp_path / "fixed").exists() else _nullcontext():
            ck.load(tmp_path / "fixed", model, opt)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_consolidated_and_fp32_export():
    model = make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **KW)
    train(model, opt, 3, 0)
    exported = export_fp32_adam(opt.state_dict())
    st = exported["state"][1]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].shape == SHAPES["w1"]
    ref = torch.optim.AdamW(make_model().parameters())
    ref.load_state_dict(exported)
    assert torch.equal(ref.state_dict()["state"][1]["exp_avg"], st["exp_avg"])


def test_bitsandbytes_state_dict_import_round_trip():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installable here")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 300))
    b_opt = bnb.optim.AdamW8bit([w], lr=1e-3, min_8bit_size=0)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        b_opt.step()
    sd = b_opt.state_dict()
    assert any("__bnb_optimizer_quant_state__" in s for s in sd["state"].values())
    converted = from_bitsandbytes(sd)
    mine = dist8.AdamW8bit([torch.nn.Parameter(w.detach().clone())], lr=1e-3, min_8bit_size=0)
    mine.load_state_dict(converted)
    ours = mine.state[mine.param_groups[0]["params"][0]]
    raw = sd["state"][0]["__bnb_optimizer_quant_state__"]
    assert torch.equal(ours["state1"], raw["state1"]) and torch.equal(ours["absmax1"], raw["absmax1"])
    assert ours["step"] == 3


@pytest.mark.parametrize("name", ["RMSprop8bit", "Adagrad8bit"])
def test_bitsandbytes_square_average_written_with_the_signed_map_is_requantized(name):
    """bitsandbytes writes RMSprop's and Adagrad's square average with the signed dynamic map, dist8 with
    the unsigned one: the converted codes were read as other numbers (up to 45% of absmax off), silently.
    Without the optimizer the load is refused naming the fix; with it the state is quantized again."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installable here")
    from dist8.kernels.rules import read_state
    from dist8.quant import dequantize_blockwise, dynamic_map

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 300))
    b_opt = getattr(bnb.optim, name)([w], lr=1e-3, min_8bit_size=0)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        b_opt.step()
    raw = b_opt.state[w]
    theirs = dequantize_blockwise(raw["state1"].reshape(-1), raw["absmax1"], dynamic_map(True))
    sd = b_opt.state_dict()
    mine = getattr(dist8, name)([torch.nn.Parameter(w.detach().clone())], lr=1e-3, min_8bit_size=0)
    with pytest.raises(ValueError, match=r"state1 codes were written with the signed dynamic map .*"
                                         r"from_bitsandbytes\(state_dict, optimizer=optimizer\)"):
        mine.load_state_dict(from_bitsandbytes(sd))
    assert not mine.state  # refused before anything was loaded
    mine.load_state_dict(from_bitsandbytes(sd, optimizer=mine))
    ours = mine.state[mine.param_groups[0]["params"][0]]
    values = read_state(ours["state1"], ours["absmax1"], dynamic_map(False), 256, False)
    err = (values - theirs).abs().view(-1, 256).amax(1) / raw["absmax1"]
    assert err.max() < 0.02, err.max()  # within a step of the unsigned map (was 0.45)
    assert ours["step"] == 3


TO_BNB = {"AdamW8bit": dict(lr=1e-3), "RMSprop8bit": dict(lr=1e-3), "Adagrad8bit": dict(lr=1e-2),
          "Lion8bit": dict(lr=1e-4), "SGD8bit": dict(lr=1e-2, momentum=0.9), "LAMB8bit": dict(lr=1e-3),
          "AdEMAMix8bit": dict(lr=1e-3)}


@pytest.mark.parametrize("name", list(TO_BNB))
def test_to_bitsandbytes_then_back(name):
    """A dist8 run continues in bitsandbytes (to_bitsandbytes) and comes back (from_bitsandbytes): the same
    codes, absmax and step where both use the same map (RMSprop/Adagrad: within a step of each map), a
    matrix (AdEMAMix stacks (2, 64, 300): its conversion took 1-D parameters only) and a bias."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installable here")
    from dist8.optim.state_schema import is_signed
    from dist8.quant import dequantize_blockwise, dynamic_map

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 300)), torch.nn.Parameter(torch.randn(300))]
    mine = getattr(dist8, name)(params, min_8bit_size=0, **TO_BNB[name])
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        mine.step()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = getattr(bnb.optim, name)(copies, min_8bit_size=0, **TO_BNB[name])
    theirs.load_state_dict(to_bitsandbytes(mine, theirs))
    back = getattr(dist8, name)([torch.nn.Parameter(p.detach().clone()) for p in params], min_8bit_size=0,
                                **TO_BNB[name])
    back.load_state_dict(from_bitsandbytes(theirs.state_dict(), optimizer=back))
    for p, q in zip(params, back.param_groups[0]["params"]):
        ours, again = mine.state[p], back.state[q]
        assert again["step"] == ours["step"] == 3
        for key in (k for k in ours if k.startswith("state")):
            i = int(key[5:])
            signed = is_signed(mine.rule, i)
            a = dequantize_blockwise(ours[key].reshape(-1), ours[f"absmax{i}"], dynamic_map(signed))
            b = dequantize_blockwise(again[key].reshape(-1), again[f"absmax{i}"], dynamic_map(signed))
            if signed == (i != 2):  # bitsandbytes' map for this state: the codes travel unchanged
                assert torch.equal(ours[key], again[key]) and torch.equal(ours[f"absmax{i}"], again[f"absmax{i}"])
            else:
                assert ((a - b).abs().max() / ours[f"absmax{i}"].max()) < 0.02, key
    for c in copies:
        c.grad = torch.randn_like(c)
    theirs.step()  # bitsandbytes steps from the converted state
    assert all(torch.isfinite(c).all() for c in copies)


def test_to_bitsandbytes_refuses_what_bitsandbytes_cannot_hold():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installable here")
    p = torch.nn.Parameter(torch.randn(300))
    p.grad = torch.randn(300)
    for kw, match in ((dict(quant_map="fp8"), "dynamic map in blocks of 256"), (dict(block_size=128), "blocks of 128"),
                      (dict(maximize=True), "param group 0 has maximize=True")):
        opt = dist8.AdamW8bit([p], min_8bit_size=0, **kw)
        opt.step()
        with pytest.raises(ck.CheckpointError, match=match):
            to_bitsandbytes(opt, bnb.optim.AdamW8bit([p], min_8bit_size=0))
    h = torch.nn.Parameter(torch.randn(300, dtype=torch.bfloat16))
    h.grad = torch.randn(300, dtype=torch.bfloat16)
    opt = dist8.AdamW8bit([h], min_8bit_size=0, master_weight_bits=24)
    opt.step()
    with pytest.raises(ck.CheckpointError, match="parameter 0 has a master-weight correction"):
        to_bitsandbytes(opt, bnb.optim.AdamW8bit([h], min_8bit_size=0))
    with pytest.raises(ck.CheckpointError, match=r"sizes \[1\] \(dist8\) and \[2\] \(bitsandbytes\)"):
        to_bitsandbytes(dist8.AdamW8bit([p]), bnb.optim.AdamW8bit([p, torch.nn.Parameter(torch.randn(3))]))


def test_ckpt_cli_info_verify_consolidate(tmp_path, capsys):
    from dist8.cli import main

    model, opt, path = _tiny_save(tmp_path)
    assert main(["ckpt", "info", path]) == 0
    assert "AdamW8bit" in capsys.readouterr().out
    assert main(["ckpt", "verify", path]) == 0
    out = str(tmp_path / "one")
    assert main(["ckpt", "consolidate", path, out]) == 0
    assert ck.read_metadata(out)["world_size"] == 1
    fresh = dist8.AdamW8bit(make_model(seed=3).named_parameters(), **KW)
    ck.load(out, None, fresh)
    for (name, p), q in zip(model.named_parameters(), [p for g in fresh.param_groups for p in g["params"]]):
        assert torch.equal(opt.state[p]["state1"], fresh.state[q]["state1"]), name
    assert main(["ckpt", "verify", str(tmp_path / "missing")]) == 2



def test_save_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path):
    """``save(path)`` replaces an earlier checkpoint at ``path``; a non-empty directory without
    ``metadata.json`` (a user's project directory) or a file is refused before anything is written,
    where it used to be replaced, deleting what it held."""
    model = make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **KW)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "train.py").write_text("precious")
    with pytest.raises(ck.CheckpointError, match=r"project exists, is not empty and is not a checkpoint "
                                                 r"\(no metadata\.json\)"):
        ck.save(project, model, opt, step=1)
    assert (project / "src" / "train.py").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["project"]  # no temporary directory left
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ck.CheckpointError, match=r"notes\.txt exists and is not a checkpoint directory"):
        ck.save(tmp_path / "notes.txt", model, opt)
    (tmp_path / "empty").mkdir()
    ck.save(tmp_path / "empty", model, opt, step=1)  # an empty directory, then a checkpoint: replaced
    ck.save(tmp_path / "empty", model, opt, step=2)
    assert ck.read_metadata(tmp_path / "empty")["step"] == 2


def _one_rank_finds_another_directory(rank, world_size, root, sharded):
    """Rank 1 sees what a node-local disk can hold: at save, a user's directory where rank 0 sees none; at
    load, a checkpoint root (``keep_last``) where rank 0 sees a checkpoint."""
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    model = make_model()
    opt = (ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, **KW) if sharded
           else dist8.AdamW8bit(model.named_parameters(), **KW))
    out = {}
    try:
        ck.save(root / ("fresh" if rank == 0 else "project"), model, opt, step=1)
    except ck.CheckpointError as exc:
        out["save"] = str(exc)
    try:
        ck.load(root / ("ckpt" if rank == 0 else "root"), model, opt)
    except ck.CheckpointError as exc:
        out["load"] = str(exc)
    return out


@pytest.mark.parametrize("sharded", [False, True])
def test_a_target_refused_on_one_rank_is_refused_on_every_rank(tmp_path, sharded):
    """``save`` checked its target directory, and ``load`` whether it was handed a checkpoint root, on each
    rank before the first collective: with disks whose contents differ between nodes, one rank refused and
    the others waited for it forever. The ranks agree first now: every rank raises, naming the rank and its
    reason, and nothing is left at rank 0's target."""
    (tmp_path / "project" / "src").mkdir(parents=True)
    (tmp_path / "project" / "src" / "train.py").write_text("precious")
    model = make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **KW)
    ck.save(tmp_path / "ckpt", model, opt, step=1)
    ck.save(tmp_path / "root", model, opt, step=1, keep_last=1)
    results = run_ranks(_one_rank_finds_another_directory, 2, tmp_path, sharded, tmp_path=tmp_path)
    assert results[1]["save"].startswith(f"{tmp_path / 'project'} exists, is not empty and is not a checkpoint")
    assert results[0]["save"].startswith("save failed on rank 1: ") and "is not a checkpoint" in results[0]["save"]
    assert not (tmp_path / "fresh").exists() and not (tmp_path / ".fresh.tmp").exists()
    assert (tmp_path / "project" / "src" / "train.py").read_text() == "precious"
    assert "is a checkpoint root" in results[1]["load"]
    assert results[0]["load"].startswith(f"loading {tmp_path / 'ckpt'} failed on rank 1: ")


def _ranks_on_their_own_disks(rank, world_size, root, case):
    """Each rank saves as a rank on its own node's disk would: ``own_paths`` gives each its own directory
    (rank 1's holding a leftover temporary directory, so its write succeeds there); ``unseen`` is one path
    whose mark rank 1 cannot read (``read_text`` failing as on a disk rank 0's writes never reach)."""
    import faulthandler

    import dist8.checkpoint.shared_dir as shared_dir

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    model = make_model()
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, **KW)
    train(model, opt, 1, 0)
    path = root / "ckpt"
    if case == "own_paths":
        path = root / f"node{rank}" / "ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if rank == 1:
            (path.parent / ".ckpt.tmp").mkdir()  # a leftover of rank 1's node: its blocks were written there
    elif case == "unseen" and rank == 1:
        shared_dir.read_text = lambda *_: (_ for _ in ()).throw(FileNotFoundError("not on this node"))
    try:
        ck.save(path, model, opt, step=1)
    except ck.CheckpointError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("case", ["own_paths", "unseen"])
def test_a_checkpoint_directory_some_rank_does_not_see_is_refused_before_any_block_is_written(tmp_path, case):
    """ShardedOptimizer ranks each write their blocks into the directory rank 0 creates. On node-local disks
    (or with a path per rank) a rank that found no such directory failed with safetensors' "No such file or
    directory", naming a random file; one that found a leftover of that name wrote its blocks there and rank 0
    finished a checkpoint without them -- silently, until a resume failed. Every rank now reads back a mark
    rank 0 wrote before anything else is written, and every rank refuses naming the rank that does not see it."""
    results = run_ranks(_ranks_on_their_own_disks, 2, tmp_path, case, tmp_path=tmp_path)
    said = "rank 1 does not see the directory rank 0 is writing the checkpoint into"
    assert said in results[1] and "storage every node shares" in results[1], results[1]
    assert results[0].startswith("save failed on rank 1: ") and said in results[0], results[0]
    if case == "own_paths":
        node0, node1 = tmp_path / "node0", tmp_path / "node1"
        assert f"rank 0 saves to {node0 / 'ckpt'}, this rank to {node1 / 'ckpt'}" in results[1]
        assert not (node0 / "ckpt").exists() and not (node0 / ".ckpt.tmp").exists()
        assert os.listdir(node1 / ".ckpt.tmp") == []  # refused before rank 1 wrote its blocks
    else:
        assert "rank 0 saves to" not in results[1]
        assert not (tmp_path / "ckpt").exists() and not (tmp_path / ".ckpt.tmp").exists()


def test_a_sharded_checkpoint_holds_no_mark_of_the_directory_check(tmp_path):
    """The mark every rank reads back is removed before the directory is renamed into place: the checkpoint
    holds what its metadata lists (``dist8 ckpt verify`` refuses files it does not list)."""
    run_ranks(save_sharded, 2, tmp_path / "ckpt", 1, {}, tmp_path=tmp_path)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["metadata.json", "model.safetensors",
                                                    "optim-00000-of-00002.safetensors",
                                                    "optim-00001-of-00002.safetensors"]


def test_consolidate_never_writes_over_or_into_the_checkpoint_it_reads(tmp_path, capsys):
    """``dist8 ckpt consolidate run/c run --force`` used to replace ``run``, deleting the checkpoint it was
    reading; the output may not be the source, hold it or lie inside it, whatever ``--force``."""
    from dist8.cli import main

    root = tmp_path / "run"
    _, _, path = _tiny_save(root)
    for out, said in ((path, "writing the output onto the checkpoint being read"),
                      (str(root), "holds the checkpoint being read"),
                      (str(tmp_path), "holds the checkpoint being read"),
                      (os.path.join(path, "one"), "lies inside the checkpoint being read")):
        capsys.readouterr()
        assert main(["ckpt", "consolidate", path, out, "--force"]) == 2
        assert said in capsys.readouterr().err
        assert main(["ckpt", "verify", path]) == 0  # the source is whole
    assert sorted(os.listdir(path)) == ["metadata.json", "model.safetensors", "optim-00000-of-00001.safetensors"]
    from dist8.checkpoint.format import CheckpointError
    from dist8.integrations.deepspeed_convert import from_deepspeed

    ds = tmp_path / "ds" / "global_step1"
    ds.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds the checkpoint being read"):  # checked before any read
        from_deepspeed(str(ds), str(tmp_path / "ds"), force=True)
    assert ds.is_dir()


def _half_model(fp32_head):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)).to(torch.bfloat16)
    if fp32_head:  # a new run that keeps its head in fp32, where the checkpoint has a bf16 head with a correction
        model[1].float()
    return model


def _state_one_rank_cannot_take(rank, world_size, path):
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    model = _half_model(False)
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-3, master_weight_bits=24, min_8bit_size=1)
    model(torch.randn(8, 64, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    ck.save(path, model, opt, step=1)
    fresh = _half_model(True)
    opt2 = ShardedOptimizer(fresh.named_parameters(), dist8.AdamW8bit, lr=1e-3, master_weight_bits=24,
                            min_8bit_size=1)
    before = [p.detach().clone() for p in fresh.parameters()]
    holds_head = any(opt2.names[piece.param].startswith("1.") for piece in opt2.pieces)
    try:
        ck.load(path, fresh, opt2)
    except ck.CheckpointError as exc:
        return {"refused": str(exc), "holds_head": holds_head, "state": len(opt2.shard_state()),
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))}
    return {"refused": None, "holds_head": holds_head}


def test_state_one_rank_refuses_at_install_is_refused_on_every_rank_and_installed_on_none(tmp_path):
    """Each rank checks the state of its own pieces when it installs them: a rank that refused alone (here the
    owner of a now-fp32 head, whose checkpoint holds a 24-bit correction) raised, while the others had loaded
    the checkpoint and trained on. Every rank now refuses, the others naming the rank, and undoes its part."""
    results = run_ranks(_state_one_rank_cannot_take, 2, tmp_path / "ckpt", tmp_path=tmp_path)
    assert sorted(r["holds_head"] for r in results) == [False, True]
    for r in results:
        assert r["refused"] is not None and "correction" in r["refused"], r
        assert r["state"] == 0 and r["unchanged"]
    other = next(r for r in results if not r["holds_head"])
    assert other["refused"].startswith(f"loading {tmp_path / 'ckpt'} failed on rank ")


def _fp32_weights_one_rank_cannot_read(rank, world_size, root):
    import faulthandler

    from safetensors.torch import save_file

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    model = _half_model(False)
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-3, master_weight_bits=24)
    weights = root / f"node{rank}" / "model-fp32.safetensors"  # a node-local copy: node 1's never arrived
    weights.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_file({k: v.float().contiguous() for k, v in model.state_dict().items()}, str(weights))
    try:
        ck.load_fp32_weights(weights, model, opt)
    except ck.CheckpointError as exc:
        return str(exc)
    return None


def test_fp32_weights_one_rank_cannot_read_are_refused_on_every_rank(tmp_path):
    """``load_fp32_weights`` into a ``ShardedOptimizer`` read and checked the file on each rank, then entered the
    optimizer's collective load: a rank that could not read its copy raised, the others waited forever."""
    messages = run_ranks(_fp32_weights_one_rank_cannot_read, 2, tmp_path, tmp_path=tmp_path)
    assert messages[1] is not None and "model-fp32.safetensors" in messages[1]
    assert messages[0] == f"load_fp32_weights failed on rank 1: {messages[1]}"


def _one_rank_sees_only_the_interrupted_saves_old_copy(rank, world_size, root):
    import faulthandler
    import shutil
    import warnings

    faulthandler.dump_traceback_later(120, exit=True)
    model = make_model()
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, **KW)
    for step in (1, 2):
        train(model, opt, 1, step)
        ck.save(root / f"s{step}", model, opt, step=step, extra={"step": step})
    torch.distributed.barrier()
    if rank == 0:  # node-local copies: node 1's was taken while a save was renaming (only .ckpt.old there)
        shutil.copytree(root / "s2", root / "node0" / "ckpt")
        shutil.copytree(root / "s1", root / "node1" / ".ckpt.old")
    torch.distributed.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return {"loaded": ck.load(root / f"node{rank}" / "ckpt", model, opt)}
        except ck.CheckpointError as exc:
            return {"refused": str(exc)}


def test_ranks_never_load_an_interrupted_saves_old_copy_on_some_ranks_only(tmp_path):
    """``load(path)`` takes ``.NAME.old`` where ``NAME`` is missing (a save interrupted between its renames).
    Decided on each rank's disk, one rank loaded step 1's copy while the other loaded step 2, silently. The
    ranks compare their choice now and refuse, naming the ranks."""
    results = run_ranks(_one_rank_sees_only_the_interrupted_saves_old_copy, 2, tmp_path, tmp_path=tmp_path)
    for r in results:
        assert r.get("refused", "").endswith("the ranks' disks differ; give every rank the same checkpoint"), r
