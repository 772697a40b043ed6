"""The bucket plan of the weight broadcast (pure; the broadcast itself is tested on Ray)."""

import torch

from copd_ray.actors.weight_sync import bucket_plan, pack, unpack


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
