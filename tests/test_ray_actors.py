"""The actor layer on a real local Ray: weight sync, scoring, data parallelism, NaN
handling, placement failures and the topology actor."""

import math

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from conftest import SMALL_ACTORS, started_branch, train_on
from copd_ray.actors import BranchGroup, PlacementError, TrainBatch
from copd_ray.config import load_config
from copd_ray.engines import SamplingParams
from copd_ray.step_data import PromptBatch, Rollouts
from copd_ray.topology import Topology
from copd_ray.topology.actor import TopologyActor

SMALL = SMALL_ACTORS


@pytest.fixture(scope="module")
def branch(ray_session, tiny_folder):
    """One branch with two sharded (FSDP2) trainer ranks and two generators."""
    cfg = load_config(None, SMALL + ["resources.num_trainers=2", "resources.num_generators=2", "ray.bucket_mb=0.5"])
    with started_branch("add", cfg, tiny_folder, "test-actors") as group:
        yield group


PROMPTS = ["123+045=", "500+500=", "001+002=", "999+001="]


def _batch(group, tokenizer, seed=0):
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    batch = PromptBatch(prompts, ["168", "1000", "3", "1000"], ["exact_match"] * 4,
                        SamplingParams(n=4, max_new_tokens=6, seed=seed))
    out = Rollouts.concat(ray.get([parts[0] for parts in group.sample(batch)]))
    rewards = [float(i % 3 == 0) for i in range(len(out.sequences()))]  # varied, so groups carry signal
    return out, TrainBatch.of(4, out.sequences(), out.prompt_lengths.tolist(), rewards, behaviour_logprobs=out.per_row(out.logprobs))


def test_rollouts_come_back_in_prompt_order_across_generators(branch, tiny_tokenizer):
    out, _ = _batch(branch, tiny_tokenizer)
    assert len(ray.get([p[0] for p in branch.sample(PromptBatch([[1, 2]] * 4, [""] * 4, ["exact_match"] * 4,
                                                                 SamplingParams()))])) == 2
    prompts = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    assert [seq[:len(prompts[i // 4])] for i, seq in enumerate(out.sequences())] == [p for p in prompts for _ in range(4)]
    assert out.prompt_lengths.tolist() == [len(p) for p in prompts for _ in range(4)]
    assert len(out.rewards.tolist()) == 16 and set(out.rewards.tolist()) <= {0.0, 1.0}
    assert [len(lp) for lp in out.per_row(out.logprobs)] == [len(s) - p for s, p in zip(out.sequences(), out.prompt_lengths.tolist())]
    assert out.version == branch.version


def test_weight_sync_delivers_the_trainers_exact_tensors(branch, tiny_tokenizer):
    _, batch = _batch(branch, tiny_tokenizer, seed=1)
    before = branch.trainer_state()
    metrics = train_on(branch, batch)
    assert metrics["nan_skipped"] == 0 and math.isfinite(metrics["loss"])
    trained = branch.trainer_state()  # gathered from the two shards
    assert any(not torch.equal(before[k], trained[k]) for k in trained)

    version = branch.version
    result = branch.sync()
    assert result["version"] == version + 1
    assert len(branch.plan) > 1  # a 0.5 MB bucket limit splits the tiny model into several buckets
    for receiver in branch.generators + [branch.scorer]:
        assert ray.get(receiver.version.remote()) == version + 1
        held = ray.get(receiver.state_dict.remote())
        assert held.keys() == trained.keys()
        assert all(torch.equal(held[k], trained[k]) for k in trained)


def test_scorer_logprobs_equal_a_direct_forward_pass(branch, tiny_folder, tiny_tokenizer):
    _, batch = _batch(branch, tiny_tokenizer, seed=2)
    sequences, plens = batch.rows.sequences(), batch.rows.prompt_lengths.tolist()
    scores = ray.get(branch.scorer.score.remote(sequences, plens))
    assert scores.version == branch.version
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    model.load_state_dict(branch.trainer_state())
    for seq, p, got in zip(sequences, plens, scores.logprobs):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0], dim=-1)
        assert got == pytest.approx([logp[t - 1, seq[t]].item() for t in range(p, len(seq))], abs=1e-5)


def test_a_nan_loss_skips_the_update(branch, tiny_tokenizer):
    out, _ = _batch(branch, tiny_tokenizer, seed=3)
    sequences, plens = out.sequences()[:2], out.prompt_lengths.tolist()[:2]
    batch = TrainBatch.of(4, [], [], [], sequences, plens, [[float("nan")] * (len(s) - p) for s, p in zip(sequences, plens)])
    before = branch.trainer_state()
    metrics = train_on(branch, batch)
    assert metrics["nan_skipped"] >= 1
    after = branch.trainer_state()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_branch_too_big_for_the_cluster_fails_fast(ray_session, tiny_folder):
    cfg = load_config(None, ["resources.trainer_cpus=64", "ray.placement_timeout_s=2"])
    group = BranchGroup("huge", cfg, str(tiny_folder), "test-placement")
    with pytest.raises(PlacementError, match=r"branch 'huge' could not be placed within 2 s: it asks for \{'CPU': 64.5"):
        group.wait_placed()


def test_topology_actor_routes_hub_and_spoke_and_takes_replacements(ray_session):
    @ray.remote(num_cpus=0)
    class Endpoint:
        def __init__(self, name):
            self.name = name

        def who(self):
            return self.name

    actor = TopologyActor.remote(Topology.hub_and_spoke("text", ["image", "video"]))
    endpoints = {n: Endpoint.remote(n) for n in ["text", "image", "video"]}
    with pytest.raises(ray.exceptions.RayTaskError, match="no registered scorer"):
        ray.get(actor.teachers_of.remote("image"))
    ray.get([actor.register.remote(n, e) for n, e in endpoints.items()])

    def teachers(student):
        handles = ray.get(actor.teachers_of.remote(student))
        return {name: ray.get(h.who.remote()) for name, h in handles.items()}

    assert teachers("text") == {"image": "image", "video": "video"}
    assert teachers("image") == {"text": "text"} and teachers("video") == {"text": "text"}
    # A restarted scorer registers again; students reach it without any other restart.
    assert ray.get(actor.register.remote("text", Endpoint.remote("text-restarted"))) == 2
    assert teachers("video") == {"text": "text-restarted"}
    with pytest.raises(ray.exceptions.RayTaskError, match="'audio' is not a branch"):
        ray.get(actor.register.remote("audio", endpoints["text"]))


def test_standalone_torch_transport_delivers_the_same_tensors(ray_session, tiny_folder, tiny_tokenizer):
    """The transport vLLM/SGLang branches use, checked here with pure-torch engines."""
    cfg = load_config(None, SMALL + ["ray.sync_transport=torch", "ray.bucket_mb=0.25"])
    with started_branch("torchsync", cfg, tiny_folder, "test-torch-transport") as group:
        assert group.transport == "torch"
        _, batch = _batch(group, tiny_tokenizer, seed=4)
        train_on(group, batch)
        assert group.sync()["version"] == 1
        trained = group.trainer_state()
        for receiver in group.generators + [group.scorer]:
            held = ray.get(receiver.state_dict.remote())
            assert all(torch.equal(held[k], trained[k]) for k in trained)
