"""The bucket plan of the weight broadcast, the buffers it travels in, and the send and
receive over a gloo group in one process (the branch's broadcast itself is tested on Ray)."""

import subprocess
import sys
import threading

import pytest
import torch
from conftest import REPO

from copd_ray.actors.weight_sync import WeightGroup, bucket_plan, fill, pack, unpack


def test_plan_buckets_by_size_and_dtype_and_sends_tied_tensors_once(tiny_model):
    state = tiny_model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    plan = bucket_plan(state, bucket_bytes=200_000)
    specs = [s for bucket in plan for s in bucket]
    sent = [s.name for s in specs]
    assert "lm_head.weight" not in sent and len(sent) == len(set(sent)) == len(state) - 1
    embed = next(s for s in specs if s.name == "model.embed_tokens.weight")
    assert embed.aliases == ("lm_head.weight",)
    assert len(plan) > 1 and all(sum(s.numel * 4 for s in b) <= 200_000 or len(b) == 1 for b in plan)

    received = dict(kv for bucket in plan for kv in unpack(pack([state[s.name] for s in bucket], "cpu"), bucket))
    assert received.keys() == state.keys()
    assert all(torch.equal(received[k], state[k]) for k in state)


def test_a_dtype_change_starts_a_new_bucket():
    state = {"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.bfloat16), "c": torch.zeros(1)}
    plan = bucket_plan(state, bucket_bytes=1 << 20)
    assert [[s.name for s in b] for b in plan] == [["a"], ["b"], ["c"]]
    assert [b[0].dtype for b in plan] == ["torch.float32", "torch.bfloat16", "torch.float32"]


def test_fill_into_a_kept_buffer_gives_the_bytes_of_a_fresh_pack():
    """The sender's path (one copy per tensor into a buffer kept across buckets, cast on
    the way) against the packing it replaced: cat of each tensor cast to the wire dtype."""
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    kept = torch.full((40,), float("nan"), dtype=torch.bfloat16)  # larger than the bucket, stale contents
    for _ in range(2):
        flat = fill(kept, tensors)
        assert flat.data_ptr() == kept.data_ptr() and flat.dtype == torch.bfloat16
        assert torch.equal(flat, torch.cat([t.to(torch.bfloat16).reshape(-1) for t in tensors]))
        tensors = [t + 1 for t in tensors]
    assert torch.equal(pack([t.to(torch.bfloat16) for t in tensors], "cpu"), fill(kept, tensors))


def test_a_gloo_group_delivers_each_sync_exactly_through_its_kept_buffers(tiny_model):
    """Rank 0 sends (two kept send buffers, the next filled while the last is on the wire)
    and two ranks receive (one kept buffer per bucket, the next bucket already coming in)
    three times, the weights changed in between: each sync arrives exactly, in the wire
    dtype, tied names on one tensor, into the same buffers as the first."""
    state = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    plan = bucket_plan(state, bucket_bytes=100_000, dtype=torch.bfloat16)
    assert len(plan) > 2
    store = torch.distributed.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    groups: list = [None] * 3

    def join(rank):
        groups[rank] = WeightGroup("test", 3, rank, "gloo", "torch", ("127.0.0.1", store.port),
                                   store=store if rank == 0 else None, timeout_s=30)

    def run_all(*targets):
        threads = [threading.Thread(target=t) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    run_all(*(lambda r=r: join(r) for r in range(3)))
    pointers = None
    for step in range(3):
        with torch.no_grad():
            for name, t in state.items():
                if name != "lm_head.weight":
                    t.add_(step)
        got: list[dict] = [{}, {}]

        def receive(i):
            got[i] = {name: (t.clone(), t.data_ptr()) for name, t in groups[i + 1].receive(plan)}

        sent = []
        run_all(lambda: sent.append(groups[0].send(plan, ([state[s.name] for s in b] for b in plan))),
                lambda: receive(0), lambda: receive(1))
        assert sent == [sum(s.numel for b in plan for s in b) * 2]
        for received in got:
            assert received.keys() == state.keys()
            assert all(torch.equal(received[k][0], state[k].to(torch.bfloat16)) for k in state)
            assert received["lm_head.weight"][1] == received["model.embed_tokens.weight"][1]
        now = [{k: p for k, (_, p) in r.items()} for r in got]
        assert pointers is None or now == pointers
        pointers = now


@pytest.mark.slow  # a benchmark's quick mode in its own process: about 20 s
def test_the_small_benchmark_checks_both_paths_and_prints_their_ratio():
    """About 20 s on 2 cores (a local Ray and three actors), 50 s on a loaded machine."""
    result = subprocess.run([sys.executable, "benchmarks/weight_sync.py", "--small"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every receiver held the sent weights exactly, the raw buffers arrived byte for byte" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["torch"], ["ray"])]
    assert sorted((r[0], r[1]) for r in rows) == sorted((t, w) for t in ("torch", "ray") for w in ("float32", "bfloat16"))
    assert all(r[-1].endswith("x") and float(r[-1][:-1]) > 0 for r in rows)
