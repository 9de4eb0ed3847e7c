"""dist8.checkpoint save/load of FSDP2 models: one format for all of dist8, exact across world sizes."""
import torch

import dist8
import dist8.checkpoint as ck
from dist_utils import run_ranks
from fsdp_utils import (DCP_KW, DcpModel, assert_same_params, assert_same_state, dcp_model, full_params, full_state,
                        reference_run, run_steps)


def _save_worker(rank, world_size, path):
    model, opt = dcp_model(world_size)
    run_steps(model, opt, 0, 3)
    ck.save(path, model, opt, step=3, extra={"step": 3})
    return None


def _load_worker(rank, world_size, path):
    model, opt = dcp_model(world_size)
    extra = ck.load(path, model, opt)
    run_steps(model, opt, extra["step"], extra["step"] + 2)
    return {"params": full_params(model), "state": full_state(opt)}


def test_fsdp2_checkpoint_saves_on_2_loads_on_3_and_on_one_process(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_save_worker, 2, path, tmp_path=tmp_path)
    meta = ck.read_metadata(path)
    assert meta["world_size"] == 1  # gathered, block layout of the global parameters
    want_params, want_state = reference_run(5)[5]
    resumed = run_ranks(_load_worker, 3, path, tmp_path=tmp_path)[0]
    assert_same_params(resumed["params"], want_params, "2 -> 3 ranks")
    assert_same_state(resumed["state"], want_state, "2 -> 3 ranks")
    # the same file loads into the unsharded optimizer
    model = DcpModel()
    opt = dist8.AdamW8bit(model.named_parameters(), **DCP_KW)
    ck.load(path, model, opt)
    three = reference_run(3)[3]
    assert_same_params({n: p.detach() for n, p in model.named_parameters()}, three[0], "2 -> 1 process")
    for name, st in three[1].items():
        mine = opt.state[dict(model.named_parameters())[name]]
        for k, v in st.items():
            assert (torch.equal(mine[k], v) if torch.is_tensor(v) else mine[k] == v), (name, k)
