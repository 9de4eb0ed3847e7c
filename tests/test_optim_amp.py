"""torch.amp.GradScaler driving dist8 optimizers: unscaling inside the kernels, whole-step skips
(``amp_unscale="kernel"``, the default), or the scaler unscaling and skipping ``step()`` itself
(``amp_unscale="scaler"``, torch's non-fused contract)."""
import pytest
import torch
import torch.distributed as dist

import dist8
from dist8.shard import ShardedOptimizer
from dist_utils import run_ranks

SCALE = 2.0**12  # a power of two: scaled gradients unscale exactly, so runs compare bitwise
CASES = {
    "AdamW8bit": (dist8.AdamW8bit, dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0)),
    "AdamW8bit-clip": (dist8.AdamW8bit, dict(lr=1e-2, min_8bit_size=0, percentile_clipping=50)),
    "Lion8bit": (dist8.Lion8bit, dict(lr=1e-3, min_8bit_size=0)),
    "LAMB8bit": (dist8.LAMB8bit, dict(lr=1e-2, min_8bit_size=0)),
    "SGD8bit-32bit": (dist8.SGD8bit, dict(lr=1e-2, momentum=0.9, optim_bits=32)),
}


def _params():
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.nn.Parameter(torch.randn(3000, generator=gen)),
            "b": torch.nn.Parameter(torch.randn(70, generator=gen))}


def _targets(step):
    gen = torch.Generator().manual_seed(100 + step)
    return {"w": torch.randn(3000, generator=gen), "b": torch.randn(70, generator=gen)}


def _loss(params, step):
    t = _targets(step)
    return sum(((p - t[n]) ** 2).sum() for n, p in params.items())


def _run(cls, kw, steps, scaler=None, unscale_first=False, bad_step=None):
    params = _params()
    opt = cls(list(params.items()), **kw)
    for step in range(steps):
        opt.zero_grad()
        loss = _loss(params, step)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if step == bad_step:
            params["b"].grad[3] = float("inf")
        if scaler is None:
            opt.step()
            continue
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    return params, opt


@pytest.mark.parametrize("name", list(CASES))
def test_grad_scaler_step_equals_unscaled_step(name):
    """Gradients scaled by a power of two and unscaled in the kernels: bitwise the unscaled run."""
    cls, kw = CASES[name]
    ref, ref_opt = _run(cls, kw, 6)
    # The scale doubles every step: percentile clipping's history must hold unscaled norms.
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1)
    got, opt = _run(cls, kw, 6, scaler=scaler)
    for n in ref:
        if name == "LAMB8bit":  # trust ratio norms are float64 sums of other (scaled) values: an ulp
            torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got[n], ref[n]), f"{name}: {n}"
        # the scaler left the gradients scaled (the kernels unscaled them): last step's scale was 2^17
        assert torch.equal(got[n].grad, ref[n].grad * SCALE * 32), n
    assert opt.amp_skips == 0 and scaler.get_scale() == SCALE * 64
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")  # the scaler removes them


def test_grad_scaler_after_unscale_and_clip():
    """scaler.unscale_ (e.g. to clip) leaves grad_scale None: the kernels take the gradients as they are."""
    cls, kw = CASES["AdamW8bit"]
    ref, _ = _run(cls, kw, 4)
    got, _ = _run(cls, kw, 4, scaler=torch.amp.GradScaler("cpu", init_scale=SCALE), unscale_first=True)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_grad_scaler_inf_skips_the_whole_step_and_backs_off():
    cls, kw = CASES["AdamW8bit"]
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    params, opt = _run(cls, kw, 2, scaler=scaler)
    before = {n: p.detach().clone() for n, p in params.items()}
    state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for n, p in params.items()}
    opt.zero_grad()
    scaler.scale(_loss(params, 2)).backward()
    params["b"].grad[3] = float("nan")  # only b: w is skipped too (the whole step, as torch does)
    scaler.step(opt)
    scaler.update()
    assert opt.amp_skips == 1 and opt.nonfinite_skips == 0
    assert scaler.get_scale() == SCALE / 2
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n]), n
        for k, v in opt.state[p].items():
            assert (torch.equal(v, state[n][k]) if torch.is_tensor(v) else v == state[n][k]), f"{n} {k}"


@pytest.mark.parametrize("name", list(CASES))
def test_scaler_mode_steps_as_the_unscaled_step(name):
    """amp_unscale="scaler": the scaler unscales the gradients itself (torch's non-fused contract); bitwise the
    unscaled run, LAMB included (its norms now see unscaled gradients)."""
    cls, kw = CASES[name]
    ref, _ = _run(cls, kw, 6)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1)
    got, opt = _run(cls, dict(kw, amp_unscale="scaler"), 6, scaler=scaler)
    assert opt._step_supports_amp_scaling is False  # torch's protocol attribute, read by GradScaler and Lightning
    for n in ref:
        assert torch.equal(got[n], ref[n]), f"{name}: {n}"
        assert torch.equal(got[n].grad, ref[n].grad), n  # unscaled by the scaler
    assert opt.amp_skips == 0 and scaler.get_scale() == SCALE * 64


def test_scaler_mode_inf_leaves_step_uncalled():
    """On inf/NaN the scaler itself skips ``step()`` (what accelerate's optimizer_step_was_skipped sees)."""
    cls, kw = CASES["AdamW8bit"]
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    params, opt = _run(cls, dict(kw, amp_unscale="scaler"), 2, scaler=scaler)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append(1))
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.zero_grad()
    scaler.scale(_loss(params, 2)).backward()
    params["b"].grad[3] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert calls == [] and opt.amp_skips == 0 and opt.nonfinite_skips == 0
    assert scaler.get_scale() == SCALE / 2
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n]), n


def _sharded_amp(rank, world_size, stage, bad_step, amp_unscale="kernel"):
    cls, kw = CASES["AdamW8bit"]
    params = _params()
    try:
        opt = ShardedOptimizer(list(params.items()), cls, stage=stage, amp_unscale=amp_unscale, **kw)
    except ValueError as err:
        return {"error": str(err), "untouched": torch.equal(params["w"].detach(), _params()["w"])}
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(_loss(params, step)).backward()  # same loss on every rank: averaging is exact
        if stage == 1:  # what DDP does: average the gradients before the step
            for p in params.values():
                dist.all_reduce(p.grad)
                p.grad /= world_size
        if step == bad_step:  # after DDP's average an inf is on every rank
            params["w"].grad[5] = float("inf")
        try:
            scaler.step(opt)
        except RuntimeError as err:
            return {"error": str(err)}
        scaler.update()
    return {"params": {n: p.detach().clone() for n, p in params.items()}, "skips": opt.amp_skips,
            "scale": scaler.get_scale()}


def _sharded_amp_both_modes(rank, world_size, stage, bad_step):
    return {mode: _sharded_amp(rank, world_size, stage, bad_step, mode) for mode in ("kernel", "scaler")}


def test_sharded_stage1_with_grad_scaler_matches_unsharded(tmp_path):
    both = run_ranks(_sharded_amp_both_modes, 2, 1, 1, tmp_path=tmp_path)
    results = [res["kernel"] for res in both]
    for res in both:  # amp_unscale="scaler": the scaler unscales and skips step(); same parameters
        assert res["scaler"]["skips"] == 0 and res["scaler"]["scale"] == SCALE / 2
        for n in res["kernel"]["params"]:
            assert torch.equal(res["scaler"]["params"][n], res["kernel"]["params"][n]), n
    cls, kw = CASES["AdamW8bit"]
    ref, _ = _run(cls, kw, 4, scaler=torch.amp.GradScaler("cpu", init_scale=SCALE), bad_step=1)
    for res in results:
        assert res["skips"] == 1 and res["scale"] == SCALE / 2
        for n in ref:
            assert torch.equal(res["params"][n], ref[n]), n


def test_sharded_stage2_on_several_ranks_refuses_grad_scaler(tmp_path):
    both = run_ranks(_sharded_amp_both_modes, 2, 2, None, tmp_path=tmp_path)
    for res in both:
        err = res["kernel"]["error"]
        assert "stage=2" in err and "GradScaler" in err and "nothing was updated" in err
        # amp_unscale="scaler" would let the scaler read gradients mid-reduction: refused at construction
        err = res["scaler"]["error"]
        assert "amp_unscale='scaler'" in err and "stage=2" in err and res["scaler"]["untouched"]


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        p = _params()
        self.w, self.b = p["w"], p["b"]

    def forward(self, t):
        return ((self.w - t["w"]) ** 2).sum() + ((self.b - t["b"]) ** 2).sum()


def _fsdp2_amp(rank, world_size, bad_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _Two()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    cls, kw = CASES["AdamW8bit"]
    try:  # each rank's scaler would decide alone whether to call step(): refused
        cls(model.named_parameters(), amp_unscale="scaler", **kw)
        refusal = None
    except ValueError as err:
        refusal = str(err)
    opt = cls(model.named_parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(model(_targets(step))).backward()
        if step == 1 and rank == bad_rank:  # inf in this rank's shard only: every rank must skip
            model.w.grad.to_local()[0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return {"params": {n: p.full_tensor() for n, p in model.named_parameters()}, "skips": opt.amp_skips,
            "scale": scaler.get_scale(), "refusal": refusal}


def test_fsdp2_with_grad_scaler_matches_unsharded(tmp_path):
    results = run_ranks(_fsdp2_amp, 2, 1, tmp_path=tmp_path)
    cls, kw = CASES["AdamW8bit"]
    ref, _ = _run(cls, kw, 4, scaler=torch.amp.GradScaler("cpu", init_scale=SCALE), bad_step=1)
    for res in results:
        assert res["skips"] == 1
        assert res["scale"] == SCALE / 2, "every rank's scaler must back off, not only the one that saw inf"
        assert "amp_unscale='scaler'" in res["refusal"] and "DTensor" in res["refusal"]
        for n in ref:
            assert torch.equal(res["params"][n], ref[n]), n
