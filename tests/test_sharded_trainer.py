"""The sharded trainer: FSDP2 over real torch.distributed gloo in two processes against
one plain rank on the same data, and token-budget micro-batches against one pass."""

import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from copd_ray import sharding
from copd_ray.batch import TrainBatch, pack_microbatches
from copd_ray.config import GRPOConfig, TrainConfig
from copd_ray.learner import Learner

# One minibatch: with more, each rank shuffles its own rows into minibatches, so the
# minibatches (not the update rule) would differ from one rank's. AdamW's first step is
# about lr per weight whatever the gradient's scale, so the pre-clipping gradient norm is
# compared too: it is what would show a wrongly scaled gradient.
GRPO = GRPOConfig(lr=1e-4, minibatches=1, loss_agg="token_mean")


def _batch(tokenizer) -> TrainBatch:
    """Four GRPO groups of four and four OPD rows, responses of varied length."""
    rnd = random.Random(0)
    seqs, plens, rewards = [], [], []
    for g in range(4):
        prompt = tokenizer(f"{g}1+2{g}=")["input_ids"]
        for _ in range(4):
            response = tokenizer(str(rnd.randint(0, 10 ** rnd.randint(1, 4))) + "</s>", add_special_tokens=False)
            seqs.append(prompt + response["input_ids"])
            plens.append(len(prompt))
            rewards.append(float(rnd.random() < 0.5))
    teacher = [[-1.0 - 0.1 * i] * (len(s) - p) for i, (s, p) in enumerate(zip(seqs[:4], plens[:4]))]
    return TrainBatch.of(4, seqs, plens, rewards, seqs[:4], plens[:4], teacher)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(rank, world, port, cases, out):
    """One rank of every case (folder, grpo, train settings, batch maker), in turn, in one
    process group: the pair starts (and imports torch) once for all of them."""
    import datetime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a desynchronised rank fails, not hangs
    results = {}
    for name, (folder, grpo, train, make_batch) in cases.items():
        learner = Learner("b", rank, world, folder, grpo, train=TrainConfig(**train))
        stats = learner.train_step(make_batch(learner).shard(rank, world))
        results[name] = {"state": sharding.full_model_state(learner.model), "stats": stats}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _text_batch(learner):
    return _batch(learner.tokenizer)


def _two_ranks(tmp_path, folder, grpo, train, make_batch=_text_batch) -> dict:
    """One case on two ranks (a pair of its own)."""
    out = tmp_path / "two.pt"
    mp.spawn(_ranks, args=(2, _free_port(), {"one": (str(folder), grpo, train, make_batch)}, str(out)), nprocs=2)
    return torch.load(out)["one"]


LOSSES = ["token_mean", "seq_mean_token_mean"]
TRAINS = [{}, {"gradient_checkpointing": True, "max_tokens_per_microbatch": 40, "logprob_chunk_tokens": 7}]


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory):
    from copd_ray.models.tiny_vl import build_image_processor, build_tiny_vl_policy, build_vl_tokenizer, save_vl_policy

    tokenizer = build_vl_tokenizer()
    return save_vl_policy(build_tiny_vl_policy(tokenizer), tokenizer, build_image_processor(),
                          tmp_path_factory.mktemp("vl") / "vl")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_folder, vl_folder) -> dict:
    """Every two-rank case of this module, from one spawned pair of processes."""
    cases = {(agg, i): (str(tiny_folder), GRPO.model_copy(update={"loss_agg": agg}), train, _text_batch)
             for agg in LOSSES for i, train in enumerate(TRAINS)}
    cases["vision"] = (str(vl_folder), GRPO, {}, _vision_batch)
    out = tmp_path_factory.mktemp("ranks") / "two.pt"
    mp.spawn(_ranks, args=(2, _free_port(), cases, str(out)), nprocs=2)
    return torch.load(out)


def _one_rank(folder, grpo, train, make_batch=_text_batch) -> dict:
    learner = Learner("b", 0, 1, str(folder), grpo, train=TrainConfig(**train))
    stats = learner.train_step(make_batch(learner))
    return {"state": learner.model.state_dict(), "stats": stats}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("loss_agg", LOSSES)
@pytest.mark.parametrize("train", range(len(TRAINS)), ids=["plain", "checkpointing+micro-batches+chunks"])
def test_two_sharded_ranks_take_the_same_step_as_one_plain_rank(two_ranks, tiny_folder, loss_agg, train):
    grpo = GRPO.model_copy(update={"loss_agg": loss_agg})
    one, two = _one_rank(tiny_folder, grpo, {}), two_ranks[(loss_agg, train)]
    base = Learner("b", 0, 1, str(tiny_folder), grpo).model.state_dict()
    assert _max_diff(one["state"], base) > 5e-5  # the step moved the weights by ~lr
    assert _max_diff(one["state"], two["state"]) < 1e-5
    for key in ("loss", "grad_norm", "entropy", "clip_fraction"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], abs=1e-5)
    assert two["stats"]["sequences"] == one["stats"]["sequences"] == 20


def test_four_micro_batches_give_the_update_of_one(tiny_folder):
    learner = Learner("b", 0, 1, str(tiny_folder), GRPO)
    lengths = _batch(learner.tokenizer).rows.lengths.tolist()
    budget = 5 * max(lengths)
    assert len(pack_microbatches(list(range(len(lengths))), lengths, budget)) == 4
    for agg in ("token_mean", "seq_mean_token_mean"):
        grpo = GRPO.model_copy(update={"loss_agg": agg})
        whole = _one_rank(tiny_folder, grpo, {})
        split = _one_rank(tiny_folder, grpo, {"max_tokens_per_microbatch": budget})
        assert _max_diff(whole["state"], split["state"]) < 1e-5
        assert split["stats"]["loss"] == pytest.approx(whole["stats"]["loss"], abs=1e-6)


def _vision_batch(learner):
    """Rank 0's share (the first two groups) has images; rank 1's has text only."""
    from copd_ray.data.synthetic import heldout_set
    from copd_ray.models.vl_inputs import VisionInputBuilder

    tok = learner.tokenizer
    builder = VisionInputBuilder.for_folder(learner.model_path)
    records = heldout_set("count", 2) + heldout_set("add", 2)
    seqs, plens = [], []
    for r in records:
        prompt = builder.build(tok(r.prompt)["input_ids"], r.images, r.videos)
        for answer in ("1", "2", "3", r.answer):
            seqs.append(prompt + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            plens.append(len(prompt))
    return TrainBatch.of(4, seqs, plens, [0.0, 1.0, 0.0, 1.0] * 4)


def test_a_rank_without_pixels_neither_hangs_nor_desynchronises(two_ranks, vl_folder):
    one = _one_rank(vl_folder, GRPO, {}, _vision_batch)
    two = two_ranks["vision"]
    visual = [k for k in one["state"] if "visual" in k]
    assert visual and _max_diff({k: one["state"][k] for k in visual}, {k: two["state"][k] for k in visual}) < 1e-5
    assert _max_diff(one["state"], two["state"]) < 1e-5


def test_optimizer_state_keyed_by_index_and_by_name_convert_both_ways(tiny_tokenizer):
    """One plain rank saves AdamW state by parameter index, sharded ranks by name: each
    loads the other's."""
    from copd_ray.models import build_tiny_policy

    model = build_tiny_policy(tiny_tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits.sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    named = sharding.named_optimizer_state(saved, model)
    assert set(named["state"]) == {n for n, p in model.named_parameters() if p.grad is not None}
    back = sharding.indexed_optimizer_state(named, model)
    assert back["param_groups"] == saved["param_groups"]
    assert back["state"].keys() == saved["state"].keys()
    assert all(torch.equal(back["state"][i][k], saved["state"][i][k]) for i in saved["state"] for k in saved["state"][i])
