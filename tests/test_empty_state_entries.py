"""An empty state entry is no state, on every load and conversion path.

``optimizer.state`` is torch's ``defaultdict(dict)``: reading ``optimizer.state[p]`` before ``p``'s first
step (logging code, a learning-rate finder, a notebook) leaves ``{}`` there, and ``state_dict()`` saves
it, as torch's, bitsandbytes' and dist8's optimizers all do. Before: ``load_state_dict`` of such a dict
-- the optimizer's own -- raised ``KeyError: "state for parameter ... has no 'state1' (keys: [])"``, and
so did ShardedOptimizer's loads, ``from_torch_optim`` of a torch AdamW dict, ``from_bitsandbytes`` and
``export_fp32_adam``: a run could not resume from its own checkpoint. Found by a random sequence of
steps, hyperparameter edits, ``add_param_group`` and state-dict round trips.
"""
import io

import pytest
import torch

import dist8
import dist8.checkpoint as ckpt
from dist8.checkpoint.convert import export_fp32_adam, from_bitsandbytes, to_bitsandbytes
from dist8.shard import ShardedOptimizer
from dist_utils import run_ranks

CLASSES = ["AdamW8bit", "Adam8bit", "Lion8bit", "SGD8bit", "RMSprop8bit", "Adagrad8bit", "LAMB8bit", "LARS8bit",
           "AdEMAMix8bit"]
KW = {"SGD8bit": {"momentum": 0.9}, "LARS8bit": {"momentum": 0.9}}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))


def _grads(model, step, skip_second=True):
    g = torch.Generator().manual_seed(step)
    for i, p in enumerate(model.parameters()):
        p.grad = None if skip_second and i >= 2 and step < 2 else torch.randn(p.shape, generator=g)


def _make(name, model):
    return getattr(dist8, name)(model.parameters(), lr=1e-2, min_8bit_size=100, **KW.get(name, {}))


@pytest.mark.parametrize("name", CLASSES)
def test_a_state_dict_with_an_entry_read_before_the_first_step_loads_and_continues_exactly(name):
    """Two steps with the second layer frozen, its state read in between, then a round trip through
    ``torch.load(weights_only=True)``: the continued run equals one that never read the state, bitwise."""
    ref_model, model = _model(), _model()
    ref, opt = _make(name, ref_model), _make(name, model)
    for step in range(2):
        for m, o in ((ref_model, ref), (model, opt)):
            _grads(m, step)
            o.step()
    second = list(model.parameters())[2]
    assert opt.state[second] == {}  # the read made the entry
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["state"][2] == {}
    opt = _make(name, model)
    opt.load_state_dict(saved)
    for step in range(2, 4):
        for m, o in ((ref_model, ref), (model, opt)):
            _grads(m, step)
            o.step()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert opt.state[p].keys() == ref.state[q].keys()
        assert all(torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v
                   for k, v in ref.state[q].items())


def _stepped_with_a_read_entry(make):
    model = _model()
    opt = make(model)
    _grads(model, 0)
    opt.step()
    _ = opt.state[list(model.parameters())[2]]
    return model, opt


def test_torch_and_bitsandbytes_state_dicts_with_empty_entries_convert():
    """torch AdamW's and bitsandbytes AdamW8bit's dicts with a read entry convert into a dist8 optimizer
    (no state for it), dist8's exports to bitsandbytes and to torch's fp32 layout take one too."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency ([test] extra)")
    _, torch_opt = _stepped_with_a_read_entry(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    opt = _make("AdamW8bit", _model())
    opt.load_state_dict(ckpt.from_torch_optim(torch_opt.state_dict(), opt))
    assert [bool(opt.state[p]) for p in opt.param_groups[0]["params"]] == [True, True, False, False]

    _, bnb_opt = _stepped_with_a_read_entry(lambda m: bnb.optim.AdamW8bit(m.parameters(), lr=1e-2, min_8bit_size=100))
    opt = _make("AdamW8bit", _model())
    opt.load_state_dict(from_bitsandbytes(bnb_opt.state_dict(), optimizer=opt))
    assert [bool(opt.state[p]) for p in opt.param_groups[0]["params"]] == [True, True, False, False]

    _, mine = _stepped_with_a_read_entry(lambda m: _make("AdamW8bit", m))
    target = bnb.optim.AdamW8bit(_model().parameters(), lr=1e-2, min_8bit_size=100)
    to_bitsandbytes(mine, target)
    exported = export_fp32_adam(mine.state_dict())
    assert exported["state"][2] == {}
    torch.optim.AdamW(_model().parameters(), lr=1e-2).load_state_dict(exported)


def _sharded_worker(rank, world_size, plain_sd, stage, root):
    made = lambda m: ShardedOptimizer(m.parameters(), dist8.AdamW8bit, stage=stage, lr=1e-2,  # noqa: E731
                                      min_8bit_size=100)
    opt, without = made(_model()), made(_model())
    opt.load_state_dict(plain_sd)  # the unsharded format, with an empty entry
    without.load_state_dict(dict(plain_sd, state={k: v for k, v in plain_sd["state"].items() if v}))
    mine, theirs = opt.shard_state(), without.shard_state()
    assert mine.keys() == theirs.keys() and not {2, 3} & mine.keys()
    assert all(torch.equal(v, theirs[i][k]) if torch.is_tensor(v) else v == theirs[i][k]
               for i, st in mine.items() for k, v in st.items())
    model, opt = _stepped_with_a_read_entry(made)
    opt.load_state_dict(opt.state_dict())  # the shard format, after a read
    ckpt.save(f"{root}/sharded", model, opt)
    again = _model(1)
    opt2 = made(again)
    ckpt.load(f"{root}/sharded", again, opt2)
    return [torch.equal(p, q) for p, q in zip(again.parameters(), model.parameters())]


@pytest.mark.parametrize("stage", [1, 2])
def test_sharded_optimizer_takes_empty_entries(tmp_path, stage):
    _, plain = _stepped_with_a_read_entry(lambda m: _make("AdamW8bit", m))
    for same in run_ranks(_sharded_worker, 2, plain.state_dict(), stage, str(tmp_path), tmp_path=tmp_path):
        assert all(same)


def _fsdp_worker(rank, world_size):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    def made():
        model = _model()
        fully_shard(model)
        return model, _make("AdamW8bit", model)

    model, opt = made()
    model(torch.ones(2, 64)).sum().backward()
    for p in list(model.parameters())[2:]:
        p.grad = None
    opt.step()
    _ = opt.state[list(model.parameters())[2]]
    saved = opt.state_dict()
    assert saved["state"][2] == {}
    other_model, other = made()
    other.load_state_dict(saved)
    dcp_model, dcp_opt = made()
    # strict=False: torch's own check wants state for every trainable parameter (torch AdamW's alike)
    set_optimizer_state_dict(dcp_model, dcp_opt, get_optimizer_state_dict(model, opt),
                             options=StateDictOptions(strict=False))
    return [bool(o.state[p]) for o, m in ((other, other_model), (dcp_opt, dcp_model)) for p in m.parameters()]


def test_fsdp2_optimizer_takes_empty_entries(tmp_path):
    for has_state in run_ranks(_fsdp_worker, 2, tmp_path=tmp_path):
        assert has_state == [True, True, False, False] * 2


def test_state_of_a_tensor_no_group_lists_is_dropped_when_empty_and_named_otherwise():
    """``optimizer.state[t]`` read for a tensor the optimizer does not hold (a frozen layer's weight, a
    parameter not yet added) made torch's ``state_dict`` raise a bare ``KeyError: <id>``: an empty entry
    is dropped now, real state is a one-line ValueError naming the tensor's shape, and nothing changes."""
    model = _model()
    opt = dist8.AdamW8bit(list(model.parameters())[:2], lr=1e-2, min_8bit_size=100)
    _grads(model, 0)
    opt.step()
    outsider = list(model.parameters())[2]
    _ = opt.state[outsider]
    assert sorted(opt.state_dict()["state"]) == [0, 1] and outsider not in opt.state
    opt.state[outsider] = {"step": 1}
    with pytest.raises(ValueError, match=r"^optimizer\.state holds state for a tensor of shape \(64, 64\) that no "
                                         r"param group lists; remove it \(del optimizer\.state\[tensor\]\) or add "
                                         r"the tensor with add_param_group$"):
        opt.state_dict()
    assert opt.state[outsider] == {"step": 1}
