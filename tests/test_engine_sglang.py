"""SGLang's adapter: request building and output parsing run anywhere; the engine itself
only where SGLang imports (a CUDA machine)."""

import importlib.util

import pytest

from copd_ray.engines import SamplingParams
from copd_ray.engines.sglang import parse_generation, parse_scores, sampling_requests, scoring_request


def test_sampling_requests_repeat_each_prompt_with_distinct_seeds():
    ids, params = sampling_requests([[1, 2], [3]], SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=5,
                                                                  stop_token_ids=(9,), seed=4))
    assert ids == [[1, 2], [1, 2], [3], [3]]
    assert {p["sampling_seed"] for p in params} == {4_000_012 + i for i in range(4)}
    assert params[0] | {"sampling_seed": 0} == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5,
                                               "stop_token_ids": [9], "sampling_seed": 0}
    assert "sampling_seed" not in sampling_requests([[1]], SamplingParams())[1][0]


def test_parse_generation():
    output = {"output_ids": [5, 2], "meta_info": {
        "output_token_logprobs": [(-0.5, 5, None), (-0.1, 2, None)],
        "output_top_logprobs": [[(-0.4, 6, None), (-0.5, 5, None)], [(-0.1, 2, None), (-3.0, 7, None)]],
        "finish_reason": {"type": "stop", "matched": 2}}}
    sample = parse_generation(1, output, top_k=2)
    assert sample.token_ids == [5, 2] and sample.logprobs == [-0.5, -0.1] and sample.finish_reason == "stop"
    assert sample.top_k_ids == [[6, 5], [2, 7]] and sample.top_k_logprobs == [[-0.4, -0.5], [-0.1, -3.0]]
    output["meta_info"]["finish_reason"] = {"type": "length", "length": 2}
    assert parse_generation(0, output, top_k=0).finish_reason == "length"


def test_scoring_request_and_parse_scores():
    assert scoring_request([1, 4, 5, 6], 2, 3) == {
        "input_ids": [1, 4, 5, 6], "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
        "return_logprob": True, "logprob_start_len": 1, "top_logprobs_num": 3}
    output = {"meta_info": {
        "input_token_logprobs": [(-1.0, 4, None), (-2.0, 5, None), (-0.3, 6, None)],
        "input_top_logprobs": [[(-0.9, 3, None)], [(-0.2, 8, None)], [(-0.3, 6, None)]]}}
    logprobs, tops = parse_scores([1, 4, 5, 6], 2, output, top_k=1)
    assert logprobs == [-2.0, -0.3] and tops == ([[8], [6]], [[-0.2], [-0.3]])
    with pytest.raises(RuntimeError, match="SGLang scored tokens"):
        parse_scores([1, 4, 5, 7], 2, output, top_k=0)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed (it needs CUDA)")
def test_sglang_engine_scores_match_its_samples(tiny_folder):
    from copd_ray.engines.sglang import SGLangEngine

    engine = SGLangEngine(str(tiny_folder))
    prompts = [[1, 5, 6, 7, 14, 4, 8, 9, 16]]
    samples = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6, seed=0))
    sequences = [prompts[0] + s.token_ids for s in samples]
    scores = engine.score(sequences, [len(prompts[0])] * 2)
    for s, row in zip(samples, scores.logprobs):
        assert row == pytest.approx(s.logprobs, abs=1e-3)
