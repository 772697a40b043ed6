"""The pure-torch engine against direct, unbatched forward passes of the same model."""

import copy

import pytest
import torch

from copd_ray.engines import HFEngine, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_tokenizer):
    return HFEngine(copy.deepcopy(tiny_model), tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, max_batch_size=16)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    # Different lengths, so the batch needs left padding.
    return [tiny_tokenizer(p)["input_ids"] for p in ["123+045=", "7*8=", "0=", "999*9="]]


def _direct_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for every t >= 1, one unpadded sequence at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))], logp


def test_sampling_logprobs_equal_a_forward_pass(engine, prompts):
    # 20 rollouts with max_batch_size 16: two batches, the second with fewer rows.
    samples = engine.generate(prompts, SamplingParams(n=5, temperature=1.0, max_new_tokens=10, seed=0))
    assert [s.prompt_index for s in samples] == [i for i in range(4) for _ in range(5)]
    worst = 0.0
    for s in samples:
        prompt = prompts[s.prompt_index]
        assert len(s.token_ids) == len(s.logprobs) >= 1
        direct, _ = _direct_logprobs(engine.model, prompt + s.token_ids)
        worst = max(worst, max(abs(a - b) for a, b in zip(s.logprobs, direct[len(prompt) - 1 :])))
    assert worst < 1e-4


def test_each_prompt_is_read_once_and_its_samples_are_those_of_repeated_prompts(engine, prompts):
    """n samples a prompt share one prefill (its KV cache copied to each row): the same
    tokens and log-probs as the prompts written out n times, read once per row."""
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=4)
    shared = engine.generate(prompts, params)
    repeated = [p for p in prompts for _ in range(3)]
    each = engine.generate(repeated, SamplingParams(n=1, temperature=1.0, max_new_tokens=8, seed=4))
    assert [s.prompt_index for s in shared] == [i // 3 for i in range(12)]
    assert [s.token_ids for s in shared] == [s.token_ids for s in each]
    for a, b in zip(shared, each):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)


def test_greedy_is_argmax_and_reproducible(engine, prompts):
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    first = engine.generate(prompts, params)
    assert [s.token_ids for s in first] == [s.token_ids for s in engine.generate(prompts, params)]
    for s in first:
        ids = list(prompts[s.prompt_index])
        for token in s.token_ids:
            _, logp = _direct_logprobs(engine.model, ids)
            assert token == int(logp[-1].argmax())
            ids.append(token)


def test_seeded_sampling_is_reproducible(engine, prompts):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=123)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]


def test_stops_at_eos_and_reports_the_reason(engine, tiny_tokenizer, prompts):
    eos = tiny_tokenizer.eos_token_id
    samples = engine.generate(prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=12, seed=5))
    stopped = [s for s in samples if s.finish_reason == "stop"]
    assert stopped, "an untrained model should emit eos somewhere in 32 samples of 12 tokens"
    for s in samples:
        if s.finish_reason == "stop":
            assert s.token_ids[-1] == eos and eos not in s.token_ids[:-1]
        else:
            assert len(s.token_ids) == 12 and eos not in s.token_ids


def test_extra_stop_tokens(engine, tiny_tokenizer, prompts):
    digits = tuple(tiny_tokenizer.convert_tokens_to_ids(list("0123456789")))
    samples = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=12, stop_token_ids=digits, seed=1))
    for s in samples:
        stops = [t for t in s.token_ids if t in digits or t == tiny_tokenizer.eos_token_id]
        assert (stops == [s.token_ids[-1]]) if s.finish_reason == "stop" else not stops


def test_top_p_keeps_only_the_nucleus(engine, prompts):
    # With a tiny top_p only the single most likely token survives: sampling is greedy.
    nucleus = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, top_p=1e-6, max_new_tokens=6, seed=3))
    greedy = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=6))
    assert [s.token_ids for s in nucleus] == [s.token_ids for s in greedy]


def test_top_k_logprobs(engine, prompts):
    samples = engine.generate(prompts[:1], SamplingParams(n=2, max_new_tokens=5, top_k_logprobs=3, seed=2))
    for s in samples:
        ids = list(prompts[0])
        for t, token in enumerate(s.token_ids):
            _, logp = _direct_logprobs(engine.model, ids)
            top = logp[-1].topk(3)
            assert s.top_k_ids[t] == top.indices.tolist()
            assert s.top_k_logprobs[t] == pytest.approx(top.values.tolist(), abs=1e-4)
            ids.append(token)


def test_score_matches_forward_pass_with_top_k(engine, prompts, tiny_tokenizer):
    sequences = [prompts[0] + [5, 6, 2], prompts[1] + [7], prompts[2] + [9, 9, 9, 9, 2]]
    plens = [len(prompts[0]), len(prompts[1]), len(prompts[2])]
    scores = engine.score(sequences, plens, top_k=2)
    assert scores.version == engine.version
    for seq, p, got, top_ids in zip(sequences, plens, scores.logprobs, scores.top_k_ids):
        direct, logp = _direct_logprobs(engine.model, seq)
        assert got == pytest.approx(direct[p - 1 :], abs=1e-5)
        assert top_ids == [logp[t].topk(2).indices.tolist() for t in range(p - 1, len(seq) - 1)]


def test_score_rejects_bad_requests(engine):
    with pytest.raises(ValueError, match="prompt length 5 outside"):
        engine.score([[1, 2, 3]], [5])
    with pytest.raises(ValueError, match="prompt length 0 outside"):
        engine.score([[1, 2, 3]], [0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.score([[1, 2, 10_000]], [1])
    with pytest.raises(ValueError, match="2 sequences but 1"):
        engine.score([[1, 2], [1, 3]], [1])


def test_update_weights_in_place_changes_outputs_and_version(tiny_model, tiny_tokenizer, prompts):
    engine = HFEngine(copy.deepcopy(tiny_model), tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    other = copy.deepcopy(tiny_model)
    torch.manual_seed(99)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seq, plen = prompts[0] + [5, 6, 7], len(prompts[0])
    before = engine.score([seq], [plen]).logprobs[0]
    engine.update_weights(other.state_dict().items(), version=3)
    after = engine.score([seq], [plen])
    assert after.version == engine.version == 3
    expected, _ = _direct_logprobs(other, seq)
    assert after.logprobs[0] == pytest.approx(expected[plen - 1 :], abs=1e-5)
    assert after.logprobs[0] != pytest.approx(before, abs=1e-3)
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))], version=4)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))], version=4)


def test_sampling_params_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
