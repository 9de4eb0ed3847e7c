"""dist8.shard.agreement: one verdict for all ranks (2 gloo ranks).

A check that reads what only one rank sees and raises before a collective leaves the other ranks
waiting there; these helpers are where such verdicts are shared. Each case would hang (turned
into a failure by the faulthandler guard) if a rank were left out.
"""
import pytest

from dist_utils import run_ranks


class Refused(Exception):
    pass


def _verdicts(rank, world_size):
    import faulthandler

    from dist8.shard.agreement import failures_on_every_rank, from_every_rank, raise_on_every_rank, rank_0_answer

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    out = {"gathered": from_every_rank(f"rank {rank}"), "answer": rank_0_answer(lambda: f"asked on rank {rank}")}

    def refuse():
        raise Refused(f"refused on rank {rank}")

    def crash():
        raise OSError(f"disk gone on rank {rank}")

    for case, question in (("refused", refuse), ("crashed", crash)):
        try:
            rank_0_answer(question, error_type=Refused)
        except (Refused, OSError) as exc:
            out[case] = f"{type(exc).__name__}: {exc}"
    try:
        raise_on_every_rank(ValueError("mine") if rank == 1 else None, None, "the check", Refused)
    except (Refused, ValueError) as exc:
        out["raised"] = f"{type(exc).__name__}: {exc}"
    raise_on_every_rank(None, None, "the check", Refused)  # nobody failed: returns on every rank
    try:
        with failures_on_every_rank(None, "reading", Refused):
            if rank == 0:
                raise OSError("unreadable")
    except (Refused, OSError) as exc:
        out["block"] = f"{type(exc).__name__}: {exc}"
    with failures_on_every_rank(None, "reading", Refused):  # nobody failed: the block's results stay
        out["kept"] = rank
    return out


def test_verdicts_reach_every_rank(tmp_path):
    r0, r1 = run_ranks(_verdicts, 2, tmp_path=tmp_path)
    assert r0["gathered"] == r1["gathered"] == ["rank 0", "rank 1"]
    assert r0["answer"] == r1["answer"] == "asked on rank 0"
    assert r0["refused"] == r1["refused"] == "Refused: refused on rank 0"
    # any other exception: as it is on rank 0, never left for the others to wait on
    assert r0["crashed"] == "OSError: disk gone on rank 0"
    assert r1["crashed"] == "Refused: the question asked on rank 0 failed there: OSError: disk gone on rank 0"
    assert r1["raised"] == "ValueError: mine"
    assert r0["raised"] == "Refused: the check failed on rank 1: mine"
    assert r0["block"] == "OSError: unreadable" and r1["block"] == "Refused: reading failed on rank 0: unreadable"
    assert (r0["kept"], r1["kept"]) == (0, 1)


def test_one_rank_alone_needs_no_process_group():
    from dist8.shard.agreement import from_every_rank, raise_on_every_rank, rank_0_answer

    assert from_every_rank(3) == [3] and rank_0_answer(lambda: 4) == 4
    raise_on_every_rank(None, None, "x")
    with pytest.raises(KeyError):
        raise_on_every_rank(KeyError("k"), None, "x")
