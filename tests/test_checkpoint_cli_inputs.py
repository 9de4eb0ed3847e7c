"""Bad inputs of ``dist8 ckpt consolidate`` / ``from-deepspeed``: one line naming the path, parameter or key,
exit code 2, and nothing lost (the source and a user's OUT are never deleted or replaced by a failed command).

Output paths (``dist8.checkpoint.dirs.check_output_dir``): a source at OUT's temporary or kept-aside name
(``.OUT.tmp`` / ``.OUT.old``, which the write removes), paths that cannot be created, a file or symlink OUT.
Input tensors and groups: consolidate reads through the one tensor reader
(``dist8.checkpoint.reader.read_whole`` -> ``read_pieces``) and checks the groups as ``dist8 ckpt verify``
does, so what ``dist8.checkpoint.load`` refuses is refused, not rewritten as a fresh checkpoint.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dist8
import dist8.checkpoint as ck
from ckpt_utils import KW, make_model
from dist8.checkpoint.dirs import install_dir, temp_dir
from dist8.checkpoint.format import CheckpointError, file_entry, manifest_hash, rank_file, write_metadata

OPTIM = "optim-00000-of-00001.safetensors"


def train(model, opt, steps):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def save_to(path, bf16=False, **kw):
    """A small trained checkpoint at ``path``; ``bf16``: bf16 parameters with master-weight corrections."""
    model = make_model().to(torch.bfloat16) if bf16 else make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **dict(KW, **(dict(master_weight_bits=24) if bf16 else {}), **kw))
    train(model, opt, 2)
    return Path(ck.save(str(path), model, opt, step=2))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A checkpoint the refusal tests must leave as it is (each checks that with ``intact``)."""
    return save_to(tmp_path_factory.mktemp("src") / "ck")


def intact(path):
    ck.verify_files(path, ck.read_metadata(path))
    return sorted(os.listdir(path)) == ["metadata.json", "model.safetensors", OPTIM]


def cli(capsys, *args):
    """``dist8 ...`` in process: (exit code, stderr); an exception escaping main fails the test (a traceback)."""
    from dist8.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def refused(capsys, *args):
    """The command exits 2 with exactly one line on stderr (no traceback); returns that line."""
    rc, err = cli(capsys, *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- F1: the source at OUT's temporary or kept-aside name ------------------------------------------------
@pytest.mark.parametrize("aside,force,link", [(".ck.tmp", False, False), (".ck.old", True, False),
                                              (".ck.tmp", True, True)])
def test_consolidate_refuses_a_source_at_the_outputs_aside_names(tmp_path, capsys, source, aside, force, link):
    """``consolidate W/.ck.tmp W/ck`` deleted its source (temp_dir removes the leftover .ck.tmp);
    ``consolidate W/.ck.old W/ck --force`` deleted it and reported success (install_dir removes .ck.old);
    a symlink there to the source was unlinked mid-write."""
    src = tmp_path / aside
    if link:
        src.symlink_to(source)
    else:
        shutil.copytree(source, src)
    out = tmp_path / "ck"
    if force:
        shutil.copytree(source, out)  # an earlier checkpoint to replace
    err = refused(capsys, "ckpt", "consolidate", src, out, *(["--force"] * force))
    assert f"{aside}, the " in err and "uses and removes" in err
    assert intact(src) and intact(source) and (not force or intact(out))


def test_from_deepspeed_refuses_a_source_at_the_outputs_temporary_name(tmp_path, capsys):
    src = tmp_path / ".out.tmp" / "global_step1"
    src.mkdir(parents=True)
    (src / "keep").write_text("x")
    err = refused(capsys, "ckpt", "from-deepspeed", src.parent, tmp_path / "out")
    assert ".out.tmp, the temporary name" in err
    assert (src / "keep").read_text() == "x"


# ---- F2: output paths that cannot be created -----------------------------------------------------------
def _out_cases(tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = {"under a file": (tmp_path / "afile" / "out", "afile is not a directory"),
             "dot": (".", "does not name a directory"), "dotdot": ("..", "does not name a directory"),
             "root": ("/", "does not name a directory"),
             "300-char name": (tmp_path / ("x" * 300), "too long")}
    if sys.platform.startswith("linux"):
        cases["under /proc"] = ("/proc/dist8-test-out", "/proc/dist8-test-out")
    return cases


@pytest.mark.parametrize("case", ["under a file", "dot", "dotdot", "root", "300-char name", "under /proc"])
def test_consolidate_out_that_cannot_be_created_is_one_line(tmp_path, capsys, monkeypatch, source, case):
    cases = _out_cases(tmp_path)
    if case not in cases:
        pytest.skip("no /proc")
    out, said = cases[case]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    err = refused(capsys, "ckpt", "consolidate", source, out)
    assert said in err
    assert intact(source) and os.listdir(tmp_path / "cwd") == []


def test_from_deepspeed_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "ds" / "global_step1").mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    assert "afile is not a directory" in refused(capsys, "ckpt", "from-deepspeed", tmp_path / "ds",
                                                 tmp_path / "afile" / "out")


def test_temp_and_install_dir_raise_checkpoint_errors_naming_the_output(tmp_path):
    """from-deepspeed calls them outside any OSError handler: an OS error was a traceback there."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write .*afile/out: creating .*afile/.out.tmp failed"):
        temp_dir(tmp_path / "afile" / "out")
    with pytest.raises(CheckpointError, match="writing .*new failed: renaming missing"):
        install_dir(tmp_path / "missing", tmp_path / "new")


def test_install_dir_puts_the_replaced_directory_back_when_the_new_one_cannot_go_in(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="renaming missing to out"):
        install_dir(tmp_path / "missing", final)
    assert (final / "keep").read_text() == "x" and not (tmp_path / ".out.old").exists()


# ---- F3: --force onto a file or a symlink ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "symlink to a file", "symlink to a directory", "dangling symlink",
                                  "symlink loop"])
@pytest.mark.parametrize("force", [True, False])
def test_consolidate_refuses_a_non_directory_out_and_moves_nothing(tmp_path, capsys, source, kind, force):
    """``--force`` onto a regular file replaced it, reported failure (rc 2) and left the user's file at
    .out.old unmentioned: a non-directory OUT is refused up front, naming it, before anything is moved."""
    target = tmp_path / "target"
    if kind.endswith("directory"):
        target.mkdir()
        (target / "precious").write_text("keep")
    elif kind == "symlink to a file":
        target.write_text("precious")
    out = tmp_path / "out"
    out.write_text("precious") if kind == "file" else out.symlink_to(out if kind == "symlink loop" else target)
    err = refused(capsys, "ckpt", "consolidate", source, out, *(["--force"] * force))
    assert "out exists and is not a directory" in err
    assert sorted(os.listdir(tmp_path)) == sorted(["out"] + (["target"] if target.exists() else []))
    assert out.is_symlink() == (kind != "file")
    if kind == "file" or kind == "symlink to a file":
        assert out.read_text() == "precious"
    if kind == "symlink to a directory":
        assert (target / "precious").read_text() == "keep"


def test_consolidate_force_replaces_a_checkpoint_beside_a_leftover_old_file(tmp_path, capsys, source):
    """A leftover ``.out.old`` that is a file (not a directory) made install_dir's rmtree fail after ``out``
    had been moved aside."""
    out = tmp_path / "out"
    shutil.copytree(source, out)
    (tmp_path / ".out.old").write_text("leftover")
    assert cli(capsys, "ckpt", "consolidate", source, out, "--force")[0] == 0
    assert intact(out) and ck.read_metadata(out)["consolidated_from"] == 1
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---- F4/F5: tensors and groups load refuses ----------------------------------------------------------------
def rewrite(path, fn, name=OPTIM):
    """Edit a rank file and re-record its size and sha256 (as an attacker or a buggy writer would)."""
    tensors = load_file(str(path / name))
    fn(tensors)
    save_file(tensors, str(path / name))
    edit_meta(path, lambda m: m["files"].__setitem__(name, file_entry(path / name)))


def edit_meta(path, fn, fix_hash=True):
    meta = json.loads((path / "metadata.json").read_text())
    fn(meta)
    if fix_hash and "manifest_sha256" in meta:
        meta["manifest_sha256"] = manifest_hash(meta)
    (path / "metadata.json").write_text(json.dumps(meta))


def to_v1(meta, lr=None):
    meta["version"] = 1
    meta.pop("manifest_sha256")
    for k in ("rule", "quant_map", "block_wise"):
        meta["optimizer"].pop(k)
    for p in meta["params"]:
        p.pop("block_size")
        p.pop("state")
    if lr is not None:
        meta["optimizer"]["param_groups"][0]["lr"] = lr


def set_(key, value):
    return lambda t: t.__setitem__(key, value(t) if callable(value) else value)


CASES = {  # name -> (bf16 checkpoint, edit of the checkpoint directory, what the error says)
    "0-d state1": (False, lambda d: rewrite(d, set_("w1::state1", torch.tensor(3, dtype=torch.uint8))),
                   "tensor w1::state1 has shape []"),
    "absmax NaN": (False, lambda d: rewrite(d, lambda t: t["w1::absmax1"].fill_(float("nan"))),
                   "tensor w1::absmax1 holds NaN or inf"),
    "codes float64": (False, lambda d: rewrite(d, set_("w1::state1", lambda t: t["w1::state1"].double())),
                      "tensor w1::state1 has dtype f64, expected uint8"),
    "absmax1 removed": (False, lambda d: rewrite(d, lambda t: t.pop("w1::absmax1")), "tensor w1::absmax1 is missing"),
    "undeclared tensor": (False, lambda d: rewrite(d, set_("w1::evil", torch.zeros(5))),
                          "parameter w1 has tensors ['evil'] that metadata does not declare"),
    "v1, lr -1": (False, lambda d: edit_meta(d, lambda m: to_v1(m, lr=-1.0), fix_hash=False),
                  "param group 0: lr = -1.0 is outside"),
    "lr true": (False, lambda d: edit_meta(d, lambda m: m["optimizer"]["param_groups"][0].__setitem__("lr", True)),
                "param group 0: lr must be a number"),
    "v1, foreign tensor": (False, lambda d: (rewrite(d, set_("w1::evil", torch.zeros(3300))),  # w1's length
                                             edit_meta(d, to_v1, fix_hash=False)),
                           "parameter w1 has tensor 'evil' of dtype float32, which is not optimizer state"),
    "correction int16, declared int8": (True, lambda d: rewrite(d, set_("w1::correction",
                                                                       lambda t: t["w1::correction"].short())),
                                        "tensor w1::correction has dtype int16, expected int8"),
    "0-d correction": (True, lambda d: rewrite(d, set_("w1::correction", torch.tensor(1, dtype=torch.int8))),
                       "tensor w1::correction has shape []"),
}


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    return save_to(tmp_path_factory.mktemp("bf16") / "ck", bf16=True)


@pytest.mark.parametrize("fp32_weights", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_consolidate_refuses_what_load_refuses(tmp_path, capsys, source, bf16_source, case, fp32_weights):
    """consolidate copied tensors and groups unchecked: a checkpoint that load refuses came out as a fresh,
    hash-stamped one (or, for a 0-d tensor, a RuntimeError traceback). The same refusal as load's now."""
    bf16, edit, said = CASES[case]
    path = tmp_path / "ck"
    shutil.copytree(bf16_source if bf16 else source, path)
    edit(path)
    err = refused(capsys, "ckpt", "consolidate", path, tmp_path / "out", *(["--fp32-weights"] * fp32_weights))
    assert said in err and str(path) in err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()
    model = make_model().to(torch.bfloat16) if bf16 else make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), **KW, **(dict(master_weight_bits=24) if bf16 else {}))
    with pytest.raises(CheckpointError):
        ck.load(path, model, opt)


@pytest.mark.parametrize("case", list(CASES))
def test_verify_refuses_what_load_refuses(tmp_path, capsys, source, bf16_source, case):
    """``dist8 ckpt verify`` checked sizes, hashes and param groups only: a NaN absmax, a float64 code tensor or
    an undeclared tensor written with a fixed hash passed as OK. It reads every tensor as load does now."""
    bf16, edit, said = CASES[case]
    path = tmp_path / "ck"
    shutil.copytree(bf16_source if bf16 else source, path)
    assert cli(capsys, "ckpt", "verify", path) == (0, "")
    edit(path)
    err = refused(capsys, "ckpt", "verify", path)
    assert said in err and str(path) in err


def test_consolidated_version_1_declares_its_state_keys(tmp_path, capsys, source):
    """A version 1 checkpoint was rewritten as version 2 with ``state`` null (nothing declared, so the
    reader went on trusting the files); now the keys and dtypes read are declared."""
    path = tmp_path / "v1"
    shutil.copytree(source, path)
    edit_meta(path, to_v1, fix_hash=False)
    assert cli(capsys, "ckpt", "consolidate", path, tmp_path / "out")[0] == 0
    declared = {p["name"]: p["state"] for p in ck.read_metadata(tmp_path / "out")["params"]}
    assert declared == {p["name"]: p["state"] for p in ck.read_metadata(source)["params"]}
    assert declared["w1"] == {"state1": "uint8", "absmax1": "float32", "state2": "uint8", "absmax2": "float32"}


def test_consolidate_of_two_rank_files_is_the_one_rank_checkpoint(tmp_path, capsys):
    """Consolidation reads through the load reader now: pieces of two rank files (one parameter cut inside,
    percentile-clipping history in both) merge into exactly the tensors one rank saved."""
    one = save_to(tmp_path / "one", percentile_clipping=50)
    two = _split_in_two(one, tmp_path / "two", cut=("w1", 2048))
    assert cli(capsys, "ckpt", "consolidate", two, tmp_path / "out")[0] == 0
    want, got = load_file(str(one / OPTIM)), load_file(str(tmp_path / "out" / OPTIM))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    meta = ck.read_metadata(tmp_path / "out")
    assert meta["consolidated_from"] == 2 and meta["pieces"] == ck.read_metadata(one)["pieces"]


def _split_in_two(one, path, cut):
    """``one``'s state as two rank files: ``cut`` = (parameter, element) starts rank 1, which holds the rest."""
    meta = ck.read_metadata(one)
    block = meta["block_size"]
    name, at = cut
    tensors = load_file(str(one / OPTIM))
    ranks = [{}, {}]
    for key, t in tensors.items():
        param, skey = key.rsplit("::", 1)
        if param != name:
            ranks[0][key] = t
        elif skey.startswith("absmax"):
            ranks[0][key], ranks[1][key] = t[:at // block], t[at // block:]
        elif skey == "gnorm_vec":
            ranks[0][key], ranks[1][key] = t, t.clone()
        else:
            ranks[0][key], ranks[1][key] = t[:at], t[at:]
    path.mkdir()
    shutil.copyfile(one / "model.safetensors", path / "model.safetensors")
    files = {"model.safetensors": meta["files"]["model.safetensors"]}
    for r, part in enumerate(ranks):
        save_file({k: v.contiguous() for k, v in part.items()}, str(path / rank_file(r, 2)))
        files[rank_file(r, 2)] = file_entry(path / rank_file(r, 2))
    pieces = [list(p) for p in meta["pieces"]["0"]]
    first = next(p for p in pieces if p[0] == name)
    second = [name, at, first[2], first[3]]
    first[2] = at
    write_metadata(path, dict(meta, world_size=2, files=files, pieces={"0": pieces, "1": [second]}))
    return path
