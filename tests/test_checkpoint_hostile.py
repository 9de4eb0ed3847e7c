"""Hostile and corrupt checkpoints: every case of issue 17 refused with one line naming the file or key.

Nothing on a load path unpickles code; paths never leave the checkpoint directory; a
failed load changes neither model nor optimizer; every metadata field is validated.
"""
import json
import os
import pickle
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

import dist8
import dist8.checkpoint as ck
from ckpt_utils import KW, make_model
from dist8.checkpoint.format import manifest_hash

OPTIM = "optim-00000-of-00001.safetensors"


def train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def saved(tmp_path, name="c", steps=2, **kw):
    model = make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **dict(KW, **kw))
    train(model, opt, steps)
    return model, opt, Path(ck.save(str(tmp_path / name), model, opt, step=steps, extra={"step": steps}))


def fresh(seed=7, **kw):
    """A model and optimizer whose values differ from the saved ones (trained on other gradients)."""
    model = make_model(seed)
    opt = dist8.AdamW8bit(model.named_parameters(), **dict(KW, **kw))
    train(model, opt, 1, seed=seed)
    return model, opt


def state_of(model, opt):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                      for n, p in model.named_parameters()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}


def same(a, b):
    if a["groups"] != b["groups"] or a["params"].keys() != b["params"].keys():
        return False
    for n in a["params"]:
        if not torch.equal(a["params"][n], b["params"][n]) or a["state"][n].keys() != b["state"][n].keys():
            return False
        for k, v in a["state"][n].items():
            w = b["state"][n][k]
            if not (torch.equal(v, w) and v.dtype == w.dtype if torch.is_tensor(v) else v == w):
                return False
    return True


def edit_meta(path, fn, fix_hash=True):
    meta_path = Path(path) / "metadata.json"
    meta = json.loads(meta_path.read_text())
    fn(meta)
    if fix_hash and "manifest_sha256" in meta:
        meta["manifest_sha256"] = manifest_hash(meta)
    meta_path.write_text(json.dumps(meta))


def refit_file(path, name):
    """Re-record size and sha256 of file ``name`` (an attacker who edits a file and its entry)."""
    def fn(meta):
        meta["files"][name] = {"size": (Path(path) / name).stat().st_size,
                               "sha256": ck.format.sha256_file(Path(path) / name)}
    edit_meta(path, fn)


def rewrite_tensors(path, name, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(Path(path) / name))
    fn(tensors)
    save_file(tensors, str(Path(path) / name))
    refit_file(path, name)


def refused(path, match, model=None, opt=None, **kw):
    """Load must raise one line naming ``match``, leaving model and optimizer exactly as they were."""
    if opt is None:
        model, opt = fresh()
    before = state_of(model, opt)
    with pytest.raises(ck.CheckpointError, match=match) as info:
        ck.load(path, model, opt, **kw)
    assert "\n" not in str(info.value), str(info.value)
    assert same(before, state_of(model, opt)), "a failed load changed the model or optimizer"
    return str(info.value)


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "dist8", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    return proc.returncode, proc.stdout, proc.stderr


def in_process_cli(*args):
    from dist8.cli import main

    return main([str(a) for a in args])


# ---- 1. no pickle, paths stay inside ------------------------------------------------------------
class Marker:
    """Unpickling this creates the marker file (what a crafted checkpoint would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickle_in_deepspeed_checkpoint_does_not_run(tmp_path):
    from dist8.integrations.deepspeed_convert import from_deepspeed

    marker = tmp_path / "pwned"
    tag = tmp_path / "ds" / "global_step3"
    tag.mkdir(parents=True)
    torch.save({"module": {}, "optimizer": Marker(marker)}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "ds" / "latest").write_text("global_step3")
    with pytest.raises(ck.CheckpointError, match="mp_rank_00_model_states.pt.*weights_only"):
        from_deepspeed(tmp_path / "ds", tmp_path / "out")
    assert not marker.exists()
    rc, _out, err = cli("ckpt", "from-deepspeed", tmp_path / "ds", tmp_path / "out2")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not marker.exists(), err


def test_from_deepspeed_accepts_the_tag_directory(tmp_path):
    from dist8.integrations.deepspeed_convert import _tag

    tag = tmp_path / "ds" / "global_step3"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert _tag(tag, None) == (tmp_path / "ds", "global_step3")
    assert _tag(tmp_path / "ds", None) == (tmp_path / "ds", "global_step3")  # one tag, no 'latest'
    (tmp_path / "ds" / "latest").write_text("../../etc")
    with pytest.raises(ck.CheckpointError, match="not a plain file name"):
        _tag(tmp_path / "ds", None)


def test_crafted_pickle_in_train_torch_checkpoint_does_not_run(tmp_path):
    from dist8.train.checkpointing import Checkpointer

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(str(tmp_path / "run"), "none", model, opt, keep_last=2)
    assert ckpt.kind == "torch"
    path = Path(ckpt.save(1, {"step": 1}))
    marker = tmp_path / "pwned"
    torch.save({"model": Marker(marker), "optimizer": {}}, path / "rank00000.pt")
    meta = json.loads((path / "train_meta.json").read_text())
    meta["files"]["rank00000.pt"] = {"size": (path / "rank00000.pt").stat().st_size,
                                     "sha256": ck.format.sha256_file(path / "rank00000.pt")}
    (path / "train_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ck.CheckpointError, match="rank00000.pt.*weights_only"):
        ckpt.load(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "sub/optim-00000-of-00001.safetensors"])
def test_file_names_from_metadata_never_leave_the_directory(tmp_path, name):
    _m, _o, path = saved(tmp_path)
    edit_meta(path, lambda m: m["files"].__setitem__(name, {"sha256": "0" * 64, "size": 1}))
    refused(path, "not a plain file name|is not model.safetensors")
    assert in_process_cli("ckpt", "verify", path) == 2
    assert in_process_cli("ckpt", "info", path) == 2


def test_symlinked_and_special_files_are_refused_without_opening(tmp_path):
    _m, _o, path = saved(tmp_path)
    outside = tmp_path / "outside.safetensors"
    os.replace(path / OPTIM, outside)
    os.symlink(outside, path / OPTIM)
    refused(path, "symlink")
    os.remove(path / OPTIM)
    os.mkfifo(path / OPTIM)
    done = []
    worker = threading.Thread(target=lambda: done.append([in_process_cli("ckpt", c, path) for c in ("info", "verify")]),
                              daemon=True)
    worker.start()
    worker.join(60)
    assert done == [[2, 2]], "a FIFO in the checkpoint blocked or was accepted"
    refused(path, "not a regular file")


def test_huge_safetensors_header_length_is_refused_before_allocating(tmp_path):
    _m, _o, path = saved(tmp_path)
    data = (path / OPTIM).read_bytes()
    (path / OPTIM).write_bytes((1 << 46).to_bytes(8, "little") + data[8:])
    refit_file(path, OPTIM)
    assert in_process_cli("ckpt", "info", path) == 2
    refused(path, OPTIM)


@pytest.mark.parametrize("target", ["/tmp", "../elsewhere", "step-00000001/../../x"])
def test_latest_pointer_outside_the_root_is_refused(tmp_path, target):
    model = make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **KW)
    train(model, opt, 1)
    ck.save(tmp_path / "run", model, opt, step=1, keep_last=2)
    (tmp_path / "run" / "latest").write_text(json.dumps({"checkpoint": target}))
    with pytest.raises(ck.CheckpointError, match="not a plain file name"):
        ck.latest(tmp_path / "run")


# ---- 2./3. metadata: schema, manifest, hyperparameters, coverage ----------------------------------
def test_metadata_edit_without_fixing_the_manifest_is_refused(tmp_path):
    _m, _o, path = saved(tmp_path)
    edit_meta(path, lambda m: m["optimizer"]["param_groups"][0].__setitem__("lr", 0.5), fix_hash=False)
    refused(path, "metadata.json fails its manifest sha256 check")
    assert in_process_cli("ckpt", "verify", path) == 2


@pytest.mark.parametrize("key,value,match", [
    ("lr", -1, "param group 0: lr = -1"), ("eps", -1, "eps = -1"), ("betas", [1.5, 0.999], r"betas\[0\] = 1.5"),
    ("lr", "fast", "lr must be a number"), ("weight_decay", -0.1, "weight_decay"), ("optim_bits", 4, "optim_bits"),
    ("betas", [0.9], "betas must be a list of 2"),
    ("lr", 1e300, r"lr = 1e\+300 is outside \[0.0, 3.4028")])  # inf as the kernels' float32
def test_hyperparameters_are_validated_naming_the_group(tmp_path, key, value, match):
    _m, _o, path = saved(tmp_path)
    edit_meta(path, lambda m: m["optimizer"]["param_groups"][0].__setitem__(key, value))
    refused(path, match)
    assert in_process_cli("ckpt", "verify", path) == 2


@pytest.mark.parametrize("key,value,match", [
    ("lr", -1.0, r"param group 0: lr = -1\.0 is outside \[0\.0, "), ("betas", (0.9,), "betas must be a"),
    ("weight_decay", -0.5, "weight_decay"), ("optim_bits", 4, "optim_bits")])
def test_a_save_refuses_values_its_load_would_refuse_and_writes_nothing(tmp_path, key, value, match):
    """A param-group value edited to one the load refuses (a negative lr, one beta) was saved, and the
    checkpoint then refused on every load: a run's newest checkpoint that can never be resumed. The save
    runs the load's check first and refuses in one line naming the group, before anything is written."""
    model, opt, first = saved(tmp_path, "root")
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"^dist8\.checkpoint\.save\(\): .*{match}.*; a checkpoint holding it "
                                         r"would not load: fix the value before saving$"):
        ck.save(str(tmp_path / "second"), model, opt, step=3)
    assert not (tmp_path / "second").exists() and not list(tmp_path.glob(".second*"))
    assert ck.load(first, *fresh()) is not None  # the earlier checkpoint is untouched


def test_nan_hyperparameter_and_negative_step_are_refused(tmp_path):
    _m, _o, path = saved(tmp_path)
    text = (path / "metadata.json").read_text()
    meta = json.loads(text)
    meta["optimizer"]["param_groups"][0]["lr"] = float("nan")
    (path / "metadata.json").write_text(json.dumps(meta))  # NaN: JSON has no NaN, so no manifest can cover it
    refused(path, "JSON cannot represent|lr is nan")
    (path / "metadata.json").write_text(text)
    edit_meta(path, lambda m: m["pieces"]["0"][1].__setitem__(3, -4))
    refused(path, r"pieces.0\[1\] step")


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.__setitem__("params", "x"), "params must be a list"),
    (lambda m: m["params"][1].__setitem__("shape", "abc"), r"params\[1\].shape must be a list"),
    (lambda m: m["params"][1]["shape"].__setitem__(0, 33.5), r"params\[1\].shape\[0\]"),
    (lambda m: m.__setitem__("pieces", []), "pieces must be an object"),
    (lambda m: m.__setitem__("files", 3), "files must be an object"),
    (lambda m: m.pop("world_size"), "world_size is missing"),
    (lambda m: m["optimizer"].pop("class"), "optimizer.class is missing"),
    (lambda m: m.__setitem__("block_size", 100), "block_size must be a power of two"),
    (lambda m: m["pieces"]["0"].__setitem__(0, ["emb", 0]), r"pieces.0\[0\] must be \[name, start, stop, step\]"),
    (lambda m: m["pieces"].__setitem__("7", []), "pieces.7 is not a rank"),
    (lambda m: m["files"][OPTIM].__setitem__("size", "big"), "size must be an integer"),
    (lambda m: m.__setitem__("extra", [1]), "extra must be an object"),
    (lambda m: m["params"][0].__setitem__("state", {"state1": "float64"}), r"params\[0\].state"),
    # found by a fuzzer (2026-12-04): each was a raw TypeError/ValueError/OverflowError/KeyError, or two lines
    (lambda m: m["pieces"]["0"][0].__setitem__(0, ["emb"]), r"pieces.0\[0\] names parameter list"),
    (lambda m: m["pieces"].__setitem__("\u00b2", m["pieces"].pop("0")), "is not a rank of world size 1"),
    (lambda m: m["optimizer"]["param_groups"][0].__setitem__("lr", 10**400),
     r"param_groups\[0\].'lr' must be a number"),
    (lambda m: m["optimizer"]["param_groups"][0].__setitem__("custom", 10**400), r"'custom' must be a number"),
    (lambda m: m.__setitem__("dist8_version", "\ud800"), "dist8_version must be a non-empty printable string"),
    (lambda m: m.pop("extra"), "extra is missing"),
    (lambda m: m["optimizer"].pop("rule"), "optimizer.rule is missing"),
    (lambda m: m["params"][0].pop("state"), r"params\[0\].state is missing"),
    (lambda m: m["params"][0].__setitem__("name", "a\nb"), r"params\[0\].name must be a non-empty printable string"),
    (lambda m: m["files"].__setitem__(OPTIM + "\n", m["files"].pop(OPTIM)), r"is not model.safetensors"),
])
def test_malformed_metadata_is_one_line_naming_the_key(tmp_path, mutate, match, capsys):
    _m, _o, path = saved(tmp_path)
    edit_meta(path, mutate)
    refused(path, match)
    capsys.readouterr()
    assert in_process_cli("ckpt", "info", path) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_cli_error_is_one_line_and_exit_2_in_a_fresh_process(tmp_path):
    _m, _o, path = saved(tmp_path)
    edit_meta(path, lambda m: m["params"][1].__setitem__("shape", "abc"))
    for command in ("info", "verify"):
        rc, _out, err = cli("ckpt", command, path)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "params[1].shape" in err, err


def test_a_stepped_parameter_without_state_is_refused_naming_it(tmp_path):
    """Its tensors taken out and its state declared empty (hashes refitted): it loaded as never stepped, its
    moments silently gone. A save writes step 0 for a parameter without state, so step > 0 says it was cut."""
    _m, _o, path = saved(tmp_path)
    name = json.loads((path / "metadata.json").read_text())["params"][0]["name"]
    rewrite_tensors(path, OPTIM, lambda t: [t.pop(k) for k in list(t) if k.startswith(name + "::")])
    edit_meta(path, lambda m: m["params"][0].__setitem__("state", {}))
    refused(path, f"parameter {name} was stepped 2 times but the checkpoint holds no state for it")


def test_json_dense_with_lists_is_refused_before_it_is_parsed(tmp_path, capsys):
    """A metadata.json (or safetensors header) of nothing but "[]," took 49x its size in memory to parse:
    at the size limit an out-of-memory kill, not a one-line error. Refused by its density first."""
    _m, _o, path = saved(tmp_path)
    (path / "metadata.json").write_text("[" + "[]," * 300_000 + "[]]")
    refused(path, "metadata.json holds 300002 JSON lists and objects")
    header = ('{"a":[' + "[]," * 100_000 + "[]]}").encode()
    (path / OPTIM).write_bytes(len(header).to_bytes(8, "little") + header)
    from dist8.checkpoint.files import safetensors_header

    with pytest.raises(ck.CheckpointError, match="safetensors header holds 100003 JSON lists and objects"):
        safetensors_header(path / OPTIM)


def test_deeply_nested_and_non_json_metadata_is_one_line(tmp_path):
    _m, _o, path = saved(tmp_path)
    (path / "metadata.json").write_text("[" * 100000 + "]" * 100000)
    refused(path, "metadata.json is not valid JSON|nested")
    nested = {"a": None}
    for _ in range(200):
        nested = {"a": nested}
    meta = json.loads(json.dumps({"format": "dist8.checkpoint", "version": 2, "extra": {}}))
    meta["extra"] = nested
    (path / "metadata.json").write_text(json.dumps(meta))
    refused(path, "nested more than")
    (path / "metadata.json").write_bytes(b"\xff\xfe{")
    refused(path, "not UTF-8|not valid JSON")


def test_parameter_missing_from_pieces_and_overlap_are_named(tmp_path):
    _m, _o, path = saved(tmp_path)
    original = (path / "metadata.json").read_text()
    edit_meta(path, lambda m: m["pieces"]["0"].pop(1))
    refused(path, "parameter w1 is in no piece")
    (path / "metadata.json").write_text(original)
    edit_meta(path, lambda m: m["pieces"]["0"].append(["w1", 0, 256, 2]))
    refused(path, "pieces of parameter w1 overlap")


def test_tensor_file_absent_from_files_is_refused(tmp_path):
    _m, _o, path = saved(tmp_path)
    data = bytearray((path / OPTIM).read_bytes())
    data[-5] ^= 0xFF
    (path / OPTIM).write_bytes(bytes(data))
    edit_meta(path, lambda m: m["files"].pop(OPTIM))
    refused(path, f"needs {OPTIM}, which 'files' does not list")


def test_tensor_lengths_are_checked_against_pieces(tmp_path):
    _m, _o, path = saved(tmp_path)
    rewrite_tensors(path, OPTIM, lambda t: t.__setitem__("w1::state1", t["w1::state1"][:-256]))
    refused(path, r"w1::state1 has shape \[3044\], its piece \[0, 3300\) needs \[3300\]")


def test_failed_load_on_a_late_parameter_changes_nothing(tmp_path):
    _m, _o, path = saved(tmp_path)
    rewrite_tensors(path, OPTIM, lambda t: t["w2::absmax1"].__setitem__(3, float("nan")))
    refused(path, "w2::absmax1 holds NaN")  # w2 is the 4th parameter; emb, w1, b1 read fine before it
    rewrite_tensors(path, OPTIM, lambda t: t["w2::absmax1"].__setitem__(3, -1.0))
    refused(path, "w2::absmax1 holds negative values")


def test_quant_map_block_size_rule_and_class_are_checked(tmp_path):
    _m, _o, path = saved(tmp_path)
    model = make_model()
    refused(path, "quant_map='linear'", model, dist8.AdamW8bit(model.named_parameters(), quant_map="linear", **KW))
    refused(path, "block_size=256.*block_size=128", model,
            dist8.AdamW8bit(model.named_parameters(), block_size=128, **KW))
    refused(path, "class='AdamW8bit'.*SGD8bit", model, dist8.SGD8bit(model.named_parameters(), lr=0.1, momentum=0.9,
                                                                    min_8bit_size=0))
    _m2, _o2, linear = saved(tmp_path, "lin", quant_map="linear")
    refused(linear, "quant_map='linear'.*'dynamic'")
    edit_meta(path, lambda m: m["optimizer"].__setitem__("rule", "LION"))
    refused(path, "rule='LION'")


def test_block_wise_false_saves_and_loads_exactly(tmp_path):
    model, opt, path = saved(tmp_path, block_wise=False)
    m2, o2 = fresh(block_wise=False)
    ck.load(path, m2, o2)
    assert same(state_of(model, opt), state_of(m2, o2))
    refused(path, "block_wise=False", *fresh())


def test_strict_false_warns_on_model_shape_mismatch(tmp_path):
    _m, _o, path = saved(tmp_path)
    other = make_model()
    other.b1 = torch.nn.Parameter(torch.zeros(34))
    opt = dist8.AdamW8bit(other.named_parameters(), **KW)
    with pytest.warns(UserWarning, match="b1"):
        ck.load(path, other, opt, strict=False)
    assert torch.equal(other.b1, torch.zeros(34)) and torch.equal(other.w1, _m.w1)


def test_version_1_checkpoint_still_loads_exactly(tmp_path):
    model, opt, path = saved(tmp_path)

    def to_v1(m):
        m["version"] = 1
        for k in ("manifest_sha256",):
            m.pop(k)
        for k in ("rule", "quant_map", "block_wise"):
            m["optimizer"].pop(k)
        for p in m["params"]:
            p.pop("block_size")
            p.pop("state")

    edit_meta(path, to_v1, fix_hash=False)
    m2, o2 = fresh()
    ck.load(path, m2, o2)
    assert same(state_of(model, opt), state_of(m2, o2))
    out = tmp_path / "v2"
    assert in_process_cli("ckpt", "consolidate", path, out) == 0  # migrates: written as version 2
    assert ck.read_metadata(out)["version"] == 2


# ---- 4. writers ---------------------------------------------------------------------------------
def test_consolidate_refuses_a_non_empty_out_without_force(tmp_path):
    _m, _o, path = saved(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert in_process_cli("ckpt", "consolidate", path, out) == 2
    assert (out / "precious.txt").read_text() == "keep me"
    assert in_process_cli("ckpt", "consolidate", path, out, "--force") == 0
    assert ck.read_metadata(out)["world_size"] == 1


def test_disk_full_leaves_no_temporary_directory_and_names_the_file(tmp_path, monkeypatch):
    import errno

    import dist8.checkpoint.io as ckio

    model, opt, _path = saved(tmp_path)
    ck.save(tmp_path / "run", model, opt, step=1, keep_last=2)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(ckio, "save_file", full)
    with pytest.raises(ck.CheckpointError, match=r"writing .*\.step-00000002\.tmp/optim-00000-of-00001\.safetensors "
                                                 "failed: No space left on device"):
        ck.save(tmp_path / "run", model, opt, step=2, keep_last=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step-00000001"]


def _torch_ckpt(tmp_path):
    from dist8.train.checkpointing import Checkpointer

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    return Checkpointer(str(tmp_path / "run"), "none", model, opt, keep_last=3)


def test_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, capsys):
    ckpt = _torch_ckpt(tmp_path)
    for step in (1, 2, 3):
        ckpt.save(step, {"step": step})
    newest = tmp_path / "run" / "step-00000003" / "rank00000.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    assert ckpt.latest().endswith("step-00000002")
    assert "step-00000003 is not intact" in capsys.readouterr().err
    assert ckpt.load(ckpt.latest())["step"] == 2
    # the same for dist8's own writer
    from dist8.train.checkpointing import Checkpointer

    model, opt, _p = saved(tmp_path)
    d8 = Checkpointer(str(tmp_path / "d8"), "none", model, opt, keep_last=3)
    assert d8.kind == "dist8"
    for step in (1, 2):
        d8.save(step, {"step": step})
    edit_meta(tmp_path / "d8" / "step-00000002", lambda m: m.__setitem__("step", 5), fix_hash=False)
    assert d8.latest().endswith("step-00000001")
    assert "step-00000002 is not intact" in capsys.readouterr().err


def _latest_seen_by_each_rank(rank, world_size, root):
    import dist8.train.checkpointing as tc

    checked = []

    def check(path):  # rank 1's read of the newest fails (a network filesystem's hiccup on that node)
        checked.append(path.name)
        if rank == 1 and path.name == "step-00000002":
            raise ck.CheckpointError(f"{path}/metadata.json: read failed")
        ck.verify_files(path, ck.read_metadata(path))

    tc._check_dist8 = check
    model = make_model()
    found = tc.Checkpointer(root, "none", model, dist8.AdamW8bit(model.named_parameters(), **KW), keep_last=3).latest()
    return {"found": found, "checked": checked}


def test_every_rank_resumes_from_the_checkpoint_rank_0_found(tmp_path):
    """Each rank looked for the newest intact checkpoint on its own: a read failing on one rank only sent
    that rank back to the older checkpoint while the others resumed from the newest, silently (and every
    rank hashed every file). Rank 0 checks now, and every rank takes its answer."""
    from dist8.train.checkpointing import Checkpointer

    model = make_model()
    writer = Checkpointer(str(tmp_path / "run"), "none", model, dist8.AdamW8bit(model.named_parameters(), **KW),
                          keep_last=3)
    for step in (1, 2):
        writer.save(step, {"step": step})
    results = run_ranks(_latest_seen_by_each_rank, 2, str(tmp_path / "run"), tmp_path=tmp_path)
    assert [r["found"] for r in results] == [str(tmp_path / "run" / "step-00000002")] * 2
    assert results[0]["checked"] == ["step-00000002"] and results[1]["checked"] == []


def _resume_where_one_rank_sees_another_disk(rank, world_size, root):
    import faulthandler

    import dist8.train.resume as tr
    from dist8.train.checkpointing import Checkpointer

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(str(root), "ddp", model, opt, keep_last=3)
    ckpt.save(1, {"step": 1})
    torch.distributed.barrier()
    newest = root / "step-00000001"
    if rank == 1:  # this node's copy of the checkpoint: its file is damaged, and --resume's probe misses it
        blob = newest / "rank00001.pt"
        blob.write_bytes(blob.read_bytes()[:-7] + b"garbage")
        real_isfile = os.path.isfile
        tr.os.path.isfile = lambda f: False if str(f).startswith(str(newest)) else real_isfile(f)
    out = {"path": tr.resume_path(None, str(newest), lambda r: Checkpointer(r, "ddp", model, opt, 3))[0]}
    try:
        ckpt.load(out["path"])
    except ck.CheckpointError as exc:
        out["refused"] = str(exc)
    return out


def test_a_resume_one_rank_sees_differently_is_decided_once_and_refused_on_every_rank(tmp_path):
    """``--resume PATH``: each rank asked its disk whether PATH is a checkpoint or a root, and a rank told
    "root" went into ``latest()``, a collective, alone. Loading: a rank whose own file failed its check
    raised while the others loaded and trained on. Rank 0 decides the first; the second is refused on every
    rank, the others naming the rank (the checkpoint is the torch writer's, as the job's ``torch.adamw``
    baseline writes it)."""
    results = run_ranks(_resume_where_one_rank_sees_another_disk, 2, tmp_path / "run", tmp_path=tmp_path)
    assert [r["path"] for r in results] == [str(tmp_path / "run" / "step-00000001")] * 2
    assert "rank00001.pt" in results[1]["refused"]
    assert results[0]["refused"].startswith(f"resuming from {tmp_path / 'run' / 'step-00000001'} failed on rank 1: ")


def _checkpointer_where_one_rank_sees_another_writer(rank, world_size, root, seeing_rank):
    import faulthandler

    import dist8.train.checkpointing as tc

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    tc.Checkpointer(str(root), "ddp", model, opt, keep_last=3).save(1, {"step": 1})  # one file per rank
    torch.distributed.barrier()
    if rank == seeing_rank:  # this node's disk: the step directory looks like another writer's
        tc.writer_of = lambda path: "dcp"
    out = {}
    try:
        ckpt = tc.Checkpointer(str(root), "ddp", model, opt, keep_last=3)
        out["latest"] = ckpt.latest()  # collective
    except ck.CheckpointError as exc:
        out["refused"] = str(exc)
    return out


@pytest.mark.parametrize("seeing_rank", [0, 1])
def test_another_writers_checkpoints_seen_by_one_rank_are_decided_by_rank_0(tmp_path, seeing_rank):
    """The training job's checkpointer refuses a root holding another writer's checkpoints. Each rank asked
    its own disk, and a rank that alone saw one raised while the others went into the next collective
    (``latest()``) and waited there forever. Rank 0's view decides for every rank, as for ``latest()``."""
    results = run_ranks(_checkpointer_where_one_rank_sees_another_writer, 2, tmp_path / "run", seeing_rank,
                        tmp_path=tmp_path)
    if seeing_rank == 0:
        assert [sorted(r) for r in results] == [["refused"]] * 2
        assert results[0]["refused"] == results[1]["refused"]
        assert "was written by torch.distributed.checkpoint" in results[1]["refused"]
    else:
        assert [r.get("latest") for r in results] == [str(tmp_path / "run" / "step-00000001")] * 2


def _job_saves_on_node_local_disks(rank, world_size, base, mode):
    """The training job's ``torch`` (``ddp``) and ``dcp`` (``fsdp2``) writers, each rank with its own disk (its
    own root): rank 1's holds a leftover temporary directory for the ``torch`` writer; DCP's writer makes one."""
    import faulthandler

    import dist8.train.checkpointing as tc

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    root = base / f"node{rank}" / "run"
    if mode == "fsdp2":
        from fsdp_utils import dcp_model, run_steps

        model, opt = dcp_model(world_size)
        run_steps(model, opt, 0, 1)
    else:
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters())
        if rank == 1:
            (root / ".step-00000001.tmp").mkdir(parents=True)
    try:
        tc.Checkpointer(str(root), mode, model, opt, keep_last=3).save(1, {"step": 1})
    except ck.CheckpointError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_the_jobs_writers_refuse_a_checkpoint_directory_some_rank_does_not_see(tmp_path, mode):
    """On node-local disks the job's ``torch`` writer wrote rank 1's file into a leftover temporary directory
    and DCP's writer made one for it, while rank 0 finished a checkpoint without rank 1's part: saved, silently,
    and the resume failed. Every rank reads back rank 0's mark first now; nothing is written."""
    results = run_ranks(_job_saves_on_node_local_disks, 2, tmp_path, mode, tmp_path=tmp_path)
    said = "rank 1 does not see the directory rank 0 is writing the checkpoint into"
    assert results[1] is not None and said in results[1], results[1]
    assert results[0].startswith("checkpoint save failed on rank 1: ") and said in results[0], results[0]
    assert not (tmp_path / "node0" / "run" / "step-00000001").exists()
    assert not (tmp_path / "node0" / "run" / ".step-00000001.tmp").exists()
    left = tmp_path / "node1" / "run" / ".step-00000001.tmp"
    assert not left.exists() or os.listdir(left) == []  # rank 1 wrote nothing


def _job_save_where_rank_1_cannot_write(rank, world_size, root):
    import faulthandler

    import dist8.train.checkpointing as tc

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    saves = torch.save

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device", str(f))

    if rank == 1:
        tc.torch.save = disk_full
    try:
        tc.Checkpointer(str(root), "ddp", model, opt, keep_last=3).save(1, {"step": 1})
    except ck.CheckpointError as exc:
        return str(exc)
    finally:
        tc.torch.save = saves
    return None


def test_the_jobs_torch_writer_removes_its_temporary_directory_when_one_rank_cannot_write(tmp_path):
    """A write error on one rank is raised on every rank naming it, and rank 0 removes the temporary directory
    (the protocol's promise; it was left behind when another rank's write failed)."""
    results = run_ranks(_job_save_where_rank_1_cannot_write, 2, tmp_path / "run", tmp_path=tmp_path)
    assert "No space left on device" in results[1] and "rank00001.pt.part" in results[1], results[1]
    assert results[0].startswith("checkpoint save failed on rank 1: "), results[0]
    assert os.listdir(tmp_path / "run") == []


def test_a_checkpoint_root_that_cannot_be_listed_is_one_line_naming_it(tmp_path, monkeypatch):
    """The other-writer check lists the root; an OSError there (permissions, a network filesystem) is one
    CheckpointError naming checkpoint.dir, which rank 0 then shares with every rank (an OSError was raised
    on rank 0 alone, leaving the others waiting for its answer)."""
    from dist8.train.checkpointing import Checkpointer

    (tmp_path / "run").mkdir()

    def unreadable(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", unreadable)
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ck.CheckpointError, match=r"^cannot read checkpoint.dir .*run: Permission denied$"):
        Checkpointer(str(tmp_path / "run"), "ddp", model, torch.optim.AdamW(model.parameters()), keep_last=3)


def test_train_torch_writer_killed_while_rotating_leaves_nothing_latest_picks(tmp_path, monkeypatch):
    import dist8.train.checkpointing as tc

    ckpt = _torch_ckpt(tmp_path)
    ckpt.keep_last = 1
    ckpt.save(1, {"step": 1})

    def killed(path, ignore_errors=False):
        for f in Path(path).glob("*.pt"):
            f.unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tc.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, {"step": 2})
    monkeypatch.undo()
    assert ckpt.latest().endswith("step-00000002")
    assert [p.name for p in (tmp_path / "run").glob("step-*")] == ["step-00000002"]
    ckpt.save(2, {"step": 2})  # overwrite the same step: the old one goes out of sight first
    assert ckpt.load(ckpt.latest())["step"] == 2
    assert sorted(os.listdir(tmp_path / "run")) == ["step-00000002"]


# ---- 5. random mutations of real checkpoints -----------------------------------------------------
def _save_two_ranks(rank, world_size, path):
    from dist8.shard import ShardedOptimizer

    model = make_model()
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, **KW)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
    ck.save(path, model, opt, step=2, extra={"step": 2})


def _mutate(rng, path):
    """One random corruption; returns (description, whether hashes were re-fixed).

    Unfixed: a byte of any file, or a metadata field -- the sha256 of the file or the manifest
    must catch it. Re-fixed (an attacker who also rewrites the hashes): a byte of a safetensors
    header, or a metadata field -- validation must refuse it or the values must be valid.
    """
    files = sorted(p.name for p in path.iterdir())
    kind = rng.choice(["byte", "byte", "field", "field"])
    if kind == "byte":
        name = rng.choice(files)
        data = bytearray((path / name).read_bytes())
        refit = name != "metadata.json" and rng.random() < 0.5
        header = 8 + int.from_bytes(data[:8], "little") if name.endswith(".safetensors") else len(data)
        i = rng.randrange(min(header, len(data)) if refit else len(data))
        data[i] = rng.randrange(256)
        (path / name).write_bytes(bytes(data))
        if refit:
            refit_file(path, name)
        return f"byte {i} of {name}", refit
    meta = json.loads((path / "metadata.json").read_text())
    slots = []

    def walk(obj, trail):
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            slots.append((obj, k, trail + [k]))
            if isinstance(v, (dict, list)):
                walk(v, trail + [k])

    walk(meta, [])
    obj, key, trail = rng.choice(slots)
    choice = rng.choice(["int", "neg", "str", "none", "list", "drop", "big"])
    new = {"int": 1, "neg": -3, "str": "x", "none": None, "list": [], "big": 1 << 40}.get(choice)
    if choice == "drop" and isinstance(obj, dict):
        obj.pop(key)
    else:
        obj[key] = new
    fix = rng.random() < 0.7
    edit_meta(path, lambda m: (m.clear(), m.update(meta)), fix_hash=fix)
    return f"{choice} at {trail}", fix


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    """A checkpoint saved by ShardedOptimizer on 2 gloo ranks (w1 and w2 are split across them)."""
    base = tmp_path_factory.mktemp("two-rank")
    run_ranks(_save_two_ranks, 2, str(base / "two"), tmp_path=base)
    return base / "two"


def test_swapped_rank_files_with_fixed_hashes_are_refused(tmp_path, two_rank):
    import shutil

    path = tmp_path / "two"
    shutil.copytree(two_rank, path)
    a, b = path / "optim-00000-of-00002.safetensors", path / "optim-00001-of-00002.safetensors"
    os.replace(a, tmp_path / "a")
    os.replace(b, a)
    os.replace(tmp_path / "a", b)
    refit_file(path, a.name)
    refit_file(path, b.name)
    refused(path, "optim-0000[01]-of-00002.safetensors")


@pytest.mark.timeout(300)
def test_random_mutations_are_refused_or_load_identically(tmp_path, two_rank):
    """Seeded random corruptions of a 1-rank and a 2-rank checkpoint: a one-line CheckpointError naming
    the checkpoint with model and optimizer untouched, or a load equal to the original (edits whose
    hashes were re-fixed may also load as edited, but never raise anything else)."""
    import shutil

    one = saved(tmp_path, "one")[2]
    two = two_rank
    rng = random.Random(17)
    outcomes = {"refused": 0, "identical": 0, "valid edit": 0}
    for original in (one, two):
        m0, o0 = fresh()
        ck.load(original, m0, o0)
        reference = state_of(m0, o0)
        for trial in range(30):
            path = tmp_path / f"m-{original.name}-{trial}"
            shutil.copytree(original, path)
            what, refit = _mutate(rng, path)
            model, opt = fresh()
            before = state_of(model, opt)
            try:
                ck.load(path, model, opt)
            except ck.CheckpointError as exc:
                assert "\n" not in str(exc), (what, str(exc))
                assert str(path) in str(exc), (what, str(exc))
                assert same(before, state_of(model, opt)), f"{what}: failed load changed state"
                outcomes["refused"] += 1
            except Exception as exc:
                raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
            else:  # with hashes re-fixed a valid edit (e.g. extra.step, lr=1) loads as edited
                assert refit or same(reference, state_of(model, opt)), f"{what}: loaded something else"
                outcomes["identical" if same(reference, state_of(model, opt)) else "valid edit"] += 1
            shutil.rmtree(path)
    assert outcomes["refused"] > 30, outcomes


# ---- the optimizer's own load_state_dict --------------------------------------------------------
def test_optimizer_load_state_dict_refuses_foreign_or_corrupt_state():
    import copy

    w = torch.nn.Parameter(torch.randn(64, 300))
    adam = dist8.AdamW8bit([w], min_8bit_size=0)
    w.grad = torch.randn_like(w)
    adam.step()
    sd = adam.state_dict()
    unnamed = {k: v for k, v in sd.items() if k != "dist8"}  # a dict passed through a library keeping torch's keys
    cases = [(dist8.SGD8bit([w], lr=0.1, momentum=0.9, min_8bit_size=0), sd,
              "^state_dict was written by an optimizer with update rule ADAM; this one's rule SGD keeps other state"),
             (dist8.SGD8bit([w], lr=0.1, momentum=0.9, min_8bit_size=0), unnamed, "state2.*SGD"),
             (dist8.AdamW8bit([w], block_size=128, min_8bit_size=0), sd, "absmax1.*blocks of 128 need")]
    nan = copy.deepcopy(sd)
    nan["state"][0]["absmax1"][0] = float("nan")
    neg = copy.deepcopy(sd)
    neg["state"][0]["step"] = -4
    nan_step = copy.deepcopy(sd)
    nan_step["state"][0]["step"] = torch.tensor(float("nan"))
    cases += [(dist8.AdamW8bit([w], min_8bit_size=0), nan, "absmax1.*NaN"),
              (dist8.AdamW8bit([w], min_8bit_size=0), neg, r"step of parameter .* in \[0, 2\*\*62\]"),
              (dist8.AdamW8bit([w], min_8bit_size=0), nan_step,
               r"^step of parameter group 0 index 0 .* in \[0, 2\*\*62\], got nan")]
    for opt, state_dict, match in cases:
        with pytest.raises((ValueError, KeyError), match=match):
            opt.load_state_dict(state_dict)
        assert not opt.state  # nothing installed
    flat = dist8.AdamW8bit([torch.nn.Parameter(torch.randn(64, 300))], block_wise=False, min_8bit_size=0)
    flat.param_groups[0]["params"][0].grad = torch.randn(64, 300)
    flat.step()
    again = dist8.AdamW8bit([torch.nn.Parameter(torch.randn(64, 300))], block_wise=False, min_8bit_size=0)
    again.load_state_dict(flat.state_dict())  # block_wise=False: one absmax per parameter, accepted


def test_bitsandbytes_conversion_refuses_malformed_state_dicts_naming_what():
    """``from_bitsandbytes`` on something that is not a bitsandbytes state dict, or one whose parts are
    malformed, raises a one-line CheckpointError naming the parameter and key (no AttributeError,
    KeyError or an unnamed "cannot convert float NaN to integer")."""
    import copy

    from dist8.checkpoint.convert import from_bitsandbytes
    from dist8.checkpoint.format import CheckpointError
    from dist8.quant import dynamic_map

    w = torch.nn.Parameter(torch.randn(2000))
    opt = dist8.AdamW8bit([w], min_8bit_size=0)
    w.grad = torch.randn_like(w)
    opt.step()
    mine = opt.state_dict()
    st = {k: v for k, v in mine["state"][0].items() if k != "step"}
    bnb_like = {"state": {0: {"step": 1, "__bnb_optimizer_quant_state__": dict(
        st, qmap1=dynamic_map(True), qmap2=dynamic_map(False))}}, "param_groups": copy.deepcopy(mine["param_groups"])}
    assert from_bitsandbytes(bnb_like)["state"][0]["step"] == 1  # the well-formed one converts
    cases = [(lambda d: d.update(state=[1]), r"^not an optimizer state dict: expected a dict with a dict 'state'"),
             (lambda d: d.pop("param_groups"), r"^not an optimizer state dict"),
             (lambda d: d["state"].update({0: [1]}), r"^parameter 0: state must be a dict, got list$"),
             (lambda d: d["state"][0].update(step=float("nan")),
                 r"^step of parameter 0 must be a whole number in \[0, 2\*\*62\], got nan$"),
             (lambda d: d["state"][0].update(step=torch.tensor(-2)),
                 r"^step of parameter 0 must be a whole number in \[0, 2\*\*62\]"),
             (lambda d: d["state"][0]["__bnb_optimizer_quant_state__"]["qmap2"].neg_(),
              r"^parameter 0: qmap2 is not the dynamic map dist8 uses"),
             # an AttributeError ('list' object has no attribute 'float') and a TypeError naming nothing
             (lambda d: d["state"][0]["__bnb_optimizer_quant_state__"].update(qmap1=dynamic_map(True).tolist()),
              r"^parameter 0: qmap1 is not the dynamic map dist8 uses"),
             (lambda d: d["state"][0].update(__bnb_optimizer_quant_state__=[1]),
              r"^parameter 0: __bnb_optimizer_quant_state__ is a list, not a dict$")]
    for mutate, match in cases:
        bad = copy.deepcopy(bnb_like)
        mutate(bad)
        with pytest.raises(CheckpointError, match=match):
            from_bitsandbytes(bad)


def test_fp32_export_refuses_what_it_cannot_read_naming_the_parameter():
    """``export_fp32_adam`` on a state dict without a second moment (Lion), with a missing, short or NaN
    absmax, a NaN step or no state dict at all: a CheckpointError naming the parameter, never NaN
    moments handed on to torch's AdamW."""
    import copy

    from dist8.checkpoint.convert import export_fp32_adam
    from dist8.checkpoint.format import CheckpointError

    w = torch.nn.Parameter(torch.randn(2000))
    adam, lion = dist8.AdamW8bit([w], min_8bit_size=0), dist8.Lion8bit([w], min_8bit_size=0)
    for opt in (adam, lion):
        w.grad = torch.randn_like(w)
        opt.step()
    sd = adam.state_dict()
    assert set(export_fp32_adam(sd)["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    cases = [(lambda d: d.update(state=5), r"^not an optimizer state dict"),
             (lambda d: d["state"][0].pop("absmax2"), r"^parameter 0: 8-bit state2 has no tensor absmax2$"),
             (lambda d: d["state"][0].update(absmax1=d["state"][0]["absmax1"][:3]),
              r"^parameter 0: absmax has 3 entries but 2000 codes in blocks of 256 need 8"),
             (lambda d: d["state"][0]["absmax1"].__setitem__(0, float("nan")),
              r"^parameter 0: absmax1 holds NaN, inf or negative values$"),
             (lambda d: d["state"][0].update(step=float("nan")),
                 r"^step of parameter 0 must be a whole number in \[0, 2\*\*62\]")]
    for mutate, match in cases:
        bad = copy.deepcopy(sd)
        mutate(bad)
        with pytest.raises(CheckpointError, match=match):
            export_fp32_adam(bad)
    with pytest.raises(CheckpointError, match=r"^parameter 0: no tensor state2 \(exp_avg_sq\); export_fp32_adam needs"):
        export_fp32_adam(lion.state_dict())


def test_dcp_metadata_pickle_is_allowlisted(tmp_path):
    import torch.distributed.checkpoint as dcp

    from dist8.checkpoint.torch_files import check_dcp_metadata

    with pytest.warns(UserWarning):  # no process group: DCP saves in a single process
        dcp.save({"w": torch.randn(4, 3), "step": 3, "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
                 checkpoint_id=str(tmp_path / "dcp"))
    check_dcp_metadata(tmp_path / "dcp" / ".metadata")  # DCP's own metadata passes
    marker = tmp_path / "pwned"
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(Marker(marker), f)
    with pytest.raises(ck.CheckpointError, match="global .*open is not allowed"):
        check_dcp_metadata(tmp_path / "dcp" / ".metadata")
    assert not marker.exists()


def _dotted_global_pickle(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle calling ``module``'s ``name`` (a dotted name: pickle resolves it attribute by
    attribute) with ``arg``."""
    def text(t):
        return b"\x8c" + bytes([len(t)]) + t.encode() + b"\x94"
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


def _dcp_dir(tmp_path):
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):  # no process group: DCP saves in a single process
        dcp.save({"w": torch.randn(4, 3), "step": 3}, checkpoint_id=str(tmp_path / "dcp"))
    return tmp_path / "dcp"


def test_dcp_metadata_cannot_reach_a_module_global_through_a_dotted_name(tmp_path):
    """The allowlist passed every name of torch.distributed.checkpoint.metadata, and pickle protocol 4
    resolves dotted names: "os.system" in that module (which imports os) ran a shell command in the
    check itself, then again in DCP's own pickle.load (found by an outside probe through `dist8 train
    --resume`). Only the classes that module defines pass now, by exact name."""
    from dist8.checkpoint.torch_files import check_dcp_metadata, read_dcp_metadata

    d = _dcp_dir(tmp_path)
    assert type(read_dcp_metadata(d)).__name__ == "Metadata"  # DCP's own metadata passes
    marker = tmp_path / "pwned"
    for module, name in [("torch.distributed.checkpoint.metadata", "os.system"),
                         ("torch.distributed.checkpoint.metadata", "torch.load"), ("torch", "serialization.load")]:
        (d / ".metadata").write_bytes(_dotted_global_pickle(module, name, f"touch {marker}"))
        expected = rf"^{d}/\.metadata is not plain DCP metadata \(nothing was run\): global {module}\.{name} is not"
        with pytest.raises(ck.CheckpointError, match=expected + " allowed in DCP metadata$"):
            check_dcp_metadata(d / ".metadata")
        assert not marker.exists()


@pytest.mark.parametrize("case", ["not-metadata", "absolute-path", "parent-path", "fifo", "symlink", "past-the-end",
                                  "negative-offset", "transform"])
def test_dcp_metadata_is_checked_before_dcp_reads_a_byte(tmp_path, case):
    """Metadata of allowed classes only could still point DCP at any file: a FIFO hung the resume, a
    symlink to /dev/zero or a path to /etc/passwd ended in multi-line tracebacks, and a metadata that was
    no Metadata at all passed the check. Each is one line naming the file now."""
    import dataclasses

    from dist8.checkpoint.torch_files import read_dcp_metadata

    d = _dcp_dir(tmp_path)
    md = pickle.loads((d / ".metadata").read_bytes())
    (index, info), = [(k, v) for k, v in md.storage_data.items() if k.fqn == "w"]
    data = d / info.relative_path
    change = {"absolute-path": {"relative_path": str(data)}, "parent-path": {"relative_path": f"../dcp/{data.name}"},
              "past-the-end": {"length": data.stat().st_size + 1}, "negative-offset": {"offset": -1},
              "transform": {"transform_descriptors": ["zstd"]}}.get(case)
    if change:
        md.storage_data[index] = dataclasses.replace(info, **change)
    if case == "fifo":
        data.unlink()
        os.mkfifo(data)
    if case == "symlink":
        data.unlink()
        data.symlink_to("/dev/zero")
    (d / ".metadata").write_bytes(pickle.dumps(5 if case == "not-metadata" else md))
    expected = {"not-metadata": "holds a int, not DCP's Metadata", "absolute-path": "is not a plain file name",
                "parent-path": "is not a plain file name", "fifo": "is not a regular file", "symlink": "is a symlink",
                "past-the-end": "are not inside", "negative-offset": "are not inside",
                "transform": "asks for load transforms"}[case]
    with pytest.raises(ck.CheckpointError, match=r"^[^\n]*" + expected.replace("(", r"\(")):
        read_dcp_metadata(d)


def test_dcp_loads_the_checked_metadata_not_the_file_again(tmp_path):
    """DCP unpickled .metadata again after the check, with plain pickle: a file swapped in between ran.
    load_dcp hands DCP the metadata it checked (checked_dcp_reader)."""
    import torch.distributed.checkpoint as dcp

    from dist8.checkpoint.torch_files import checked_dcp_reader

    d = _dcp_dir(tmp_path)
    reader = checked_dcp_reader(d)
    marker = tmp_path / "pwned"
    with open(d / ".metadata", "wb") as f:
        pickle.dump(Marker(marker), f)
    state = {"w": torch.zeros(4, 3), "step": 0}
    with pytest.warns(UserWarning):  # no process group
        dcp.load(state, storage_reader=reader)
    assert not marker.exists() and state["step"] == 3 and state["w"].abs().sum() > 0


def test_dcp_metadata_of_python_3_13_pickles_a_path_from_pathlib_local(tmp_path, monkeypatch):
    """Python 3.13 moved pathlib's classes to ``pathlib._local``, and DCP's metadata pickles the
    checkpoint's path: on 3.13 every DCP checkpoint was refused ("global pathlib._local.PosixPath
    is not allowed", found in a Python 3.13.0 venv). Here the 3.13 pickle is written on any
    Python: the metadata names ``pathlib._local`` (made an alias of pathlib where it is absent)."""
    import pathlib

    from dist8.checkpoint.torch_files import check_dcp_metadata

    if not hasattr(sys.modules.get("pathlib._local"), "PosixPath"):
        monkeypatch.setitem(sys.modules, "pathlib._local", pathlib)
    module_before = pathlib.PosixPath.__module__
    monkeypatch.setattr(pathlib.PosixPath, "__module__", "pathlib._local")
    monkeypatch.setattr(pathlib.PurePosixPath, "__module__", "pathlib._local")
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    md = Metadata(state_dict_metadata={}, planner_data={"pure": pathlib.PurePosixPath("a/b")}, storage_data={},
                  storage_meta=StorageMeta(checkpoint_id=pathlib.PosixPath("/ckpt")))
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(md, f, protocol=4)
    assert b"pathlib._local" in (tmp_path / ".metadata").read_bytes(), module_before
    check_dcp_metadata(tmp_path / ".metadata")


def test_load_dcp_refuses_hostile_metadata_before_dcp_reads_it(tmp_path):
    # dist8.integrations.fsdp.load_dcp called directly (not through the train job) checks the
    # pickle of .metadata against the allowlist before DCP's own pickle.load sees it.
    import copy

    from dist8.integrations.fsdp import load_dcp, save_dcp

    model = torch.nn.Linear(16, 300)
    opt = dist8.AdamW8bit(model.parameters(), min_8bit_size=0)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with pytest.warns(UserWarning):  # no process group: DCP saves in a single process
        save_dcp(str(tmp_path / "dcp"), model, opt, extra={"step": 1})
    fresh_model = torch.nn.Linear(16, 300)
    fresh = dist8.AdamW8bit(fresh_model.parameters(), min_8bit_size=0)
    with pytest.warns(UserWarning):
        assert load_dcp(str(tmp_path / "dcp"), fresh_model, fresh, extra={"step": 0}) == {"step": 1}
    assert torch.equal(fresh_model.weight, model.weight)
    marker = tmp_path / "pwned"
    with open(tmp_path / "dcp" / ".metadata", "wb") as f:
        pickle.dump(Marker(marker), f)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ck.CheckpointError, match="global .*open is not allowed"):
        load_dcp(str(tmp_path / "dcp"), fresh_model, fresh, extra={"step": 0})
    assert not marker.exists()
    for i, st in before["state"].items():
        for k, v in st.items():
            got = fresh.state_dict()["state"][i][k]
            assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v, (i, k)


def _load_dcp_refused_on_rank_1(rank, world_size, root):
    import faulthandler

    import dist8.checkpoint.torch_files as torch_files
    from dist8.integrations.fsdp import load_dcp, save_dcp

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 300)
    opt = dist8.AdamW8bit(model.parameters(), min_8bit_size=0)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    save_dcp(root, model, opt)
    if rank == 1:  # what a crafted .metadata, or one this node's disk holds alone, makes the check raise
        def refuse(path):
            raise ck.CheckpointError(f"{path}: global os.system is not allowed")
        torch_files.read_dcp_metadata = refuse
    try:
        load_dcp(root, model, opt)
    except (ck.CheckpointError, RuntimeError) as exc:
        return str(exc)
    return None


def test_load_dcp_refused_on_one_rank_is_refused_on_every_rank(tmp_path):
    """load_dcp checked .metadata on each rank before DCP's collectives: a rank that refused it alone left
    the others waiting in dcp.load forever. Every rank raises now, the others naming the rank."""
    messages = run_ranks(_load_dcp_refused_on_rank_1, 2, str(tmp_path / "dcp"), tmp_path=tmp_path)
    assert messages[1].endswith("global os.system is not allowed")
    assert messages[0] == f"load_dcp({str(tmp_path / 'dcp')!r}) failed on rank 1: {messages[1]}"


def test_state_dict_with_codes_cast_to_float_or_mixed_kinds_is_refused():
    # torch.optim.Optimizer.load_state_dict casts floating state to the parameter's dtype; a
    # converter that did the same to dist8's codes (uint8 -> float32 values 0..255) must not load
    # as 32-bit state: that run stepped its parameter to 604 (lr 1e-3).
    import copy

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(300, 5))
    opt = dist8.AdamW8bit([w], min_8bit_size=0)
    w.grad = torch.randn_like(w)
    opt.step()
    sd = opt.state_dict()
    cast = copy.deepcopy(sd)
    cast["state"][0]["state1"] = cast["state"][0]["state1"].float()
    mixed = copy.deepcopy(cast)
    del mixed["state"][0]["absmax1"]
    all32 = copy.deepcopy(mixed)
    all32["state"][0]["state2"] = all32["state"][0]["state2"].float()
    del all32["state"][0]["absmax2"]
    cases = [(cast, "state1 .* has dtype torch.float32 but comes with absmax1"),
             (mixed, "mixes 8-bit and 32-bit states"),
             (all32, "is 32-bit, but the optimizer keeps 8-bit state")]
    for state_dict, match in cases:
        fresh = dist8.AdamW8bit([torch.nn.Parameter(torch.randn(300, 5))], min_8bit_size=0)
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(state_dict)
        assert not fresh.state
    # the genuine article, and 32-bit state where the saved groups ask for it, still load
    dist8.AdamW8bit([torch.nn.Parameter(torch.randn(300, 5))], min_8bit_size=0).load_state_dict(sd)
    all32["param_groups"][0]["optim_bits"] = 32
    with pytest.warns(UserWarning, match=r"optim_bits=32 \(this optimizer: 8\)"):  # decision 30's warning
        dist8.AdamW8bit([torch.nn.Parameter(torch.randn(300, 5))], min_8bit_size=0).load_state_dict(all32)


def test_malformed_state_signed_record_is_one_line():
    """from_bitsandbytes records the sign of each state's map (dist8.state_signed); a mutated record is refused
    naming the key, before anything loads."""
    p = torch.nn.Parameter(torch.randn(300))
    p.grad = torch.randn(300)
    opt = dist8.RMSprop8bit([p], min_8bit_size=0)
    opt.step()
    for bad in ({"1": torch.ones(3)}, {"x": True}, {"1": "yes"}, {1: True}):
        sd = opt.state_dict()
        sd["dist8"]["state_signed"] = bad
        fresh = dist8.RMSprop8bit([p], min_8bit_size=0)
        with pytest.raises(ValueError, match=r"^state_dict's dist8.state_signed must map state numbers") as info:
            fresh.load_state_dict(sd)
        assert "\n" not in str(info.value) and not fresh.state


def test_a_save_its_own_rotation_would_delete_at_once_is_refused(tmp_path):
    """``save(root, step=5, keep_last=2)`` into a root holding an earlier, longer run's step-15 and step-20:
    the save went through, the rotation removed it at once and ``latest`` named a checkpoint that was gone,
    silently. Refused before anything is written, naming the root and the later checkpoints."""
    import dist8.checkpoint as ck
    from dist8.checkpoint import CheckpointError

    model = torch.nn.Linear(8, 8)
    opt = dist8.AdamW8bit(model.parameters())
    for step in (15, 20):
        ck.save(tmp_path, model, opt, step=step, keep_last=2)
    with pytest.raises(CheckpointError, match=r"holds 2 checkpoints of later steps than 5 \(step-00000020, "
                                              r"step-00000015\), an earlier run's: keeping the newest 2 would delete"):
        ck.save(tmp_path, model, opt, step=5, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000015", "step-00000020"]
    ck.save(tmp_path, model, opt, step=5, keep_last=3)  # kept: nothing to refuse
    assert ck.latest(tmp_path).endswith("step-00000005")
