"""The multimodal foundation: visual tasks, the tiny vision-language policy and its inputs."""

import numpy as np
import pytest
import torch

from copd_ray.data.synthetic import heldout_set, training_stream
from copd_ray.models.tiny_vl import build_image_processor, build_tiny_vl_policy, build_vl_tokenizer, save_vl_policy
from copd_ray.models.vl_inputs import IMAGE, TEXT, VIDEO, VisionInputBuilder


@pytest.fixture(scope="module")
def vl():
    tokenizer = build_vl_tokenizer()
    model = build_tiny_vl_policy(tokenizer).eval()
    processor = build_image_processor()
    return tokenizer, model, processor, VisionInputBuilder(tokenizer, processor, model.config)


def test_count_images_show_as_many_squares_as_the_answer_says():
    for r in heldout_set("count", 100):
        white = r.images[0][..., 0] > 0
        assert white.sum() == 64 * int(r.answer)  # 8x8 squares that never touch
    assert {r.answer for r in heldout_set("count", 100)} == {"1", "2", "3", "4"}


def test_motion_videos_move_the_way_the_answer_says():
    for r in heldout_set("motion", 100):
        centres = [np.argwhere(f[..., 0] > 0).mean(axis=0) for f in r.videos[0]]
        dy, dx = centres[-1] - centres[0]
        seen = {"down": dy > 0, "up": dy < 0, "right": dx > 0, "left": dx < 0}
        assert seen[r.answer] and sum(seen.values()) == 1 and len(r.videos[0]) == 4


def test_visual_held_out_problems_never_appear_in_training():
    held = heldout_set("count", 300)
    keys = {r.images[0].tobytes() for r in held}
    stream = training_stream("count", held, seed=1)
    assert not any(next(stream).images[0].tobytes() in keys for _ in range(3000))


def test_a_record_with_an_image_builds_the_same_inputs_each_time(vl):
    tokenizer, _, _, builder = vl
    record = heldout_set("count", 1)[0]
    text = tokenizer(record.prompt)["input_ids"]
    a, b = builder.build(text, record.images), builder.build(text, record.images)
    assert a.input_ids == b.input_ids and torch.equal(a.pixel_values, b.pixel_values)
    assert a.token_types.count(IMAGE) == int(a.image_grid_thw.prod()) // 4 == 4
    assert a.input_ids[-len(text) + 1:] == text[1:] and a.input_ids.count(tokenizer.bos_token_id) == 1


def test_a_video_of_one_repeated_frame_patchifies_like_that_image(vl):
    """The video layout is written here (the Qwen-VL video processor needs torchvision);
    a still video must give exactly the image processor's patches."""
    _, _, _, builder = vl
    frame = (np.random.RandomState(0).rand(70, 90, 3) * 255).astype(np.uint8)
    image = builder.build([], images=[frame])
    video = builder.build([], videos=[[frame, frame]])
    assert torch.equal(video.pixel_values_videos, image.pixel_values)
    assert video.video_grid_thw.tolist() == image.image_grid_thw.tolist()
    four = builder.build([], videos=[[frame] * 3])  # padded to 4 frames: 2 temporal patches
    assert four.video_grid_thw[0, 0] == 2 and four.token_types.count(VIDEO) == 2 * int(image.image_grid_thw.prod()) // 4


def test_the_tiny_policy_reads_images_and_videos_and_reloads_as_a_checkpoint(vl, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tokenizer, model, processor, builder = vl
    record, clip = heldout_set("count", 1)[0], heldout_set("motion", 1)[0]
    inputs = builder.build(tokenizer(record.prompt)["input_ids"], record.images, clip.videos)
    assert set(inputs.token_types) == {TEXT, IMAGE, VIDEO}
    with torch.no_grad():
        logits = model(**inputs.model_kwargs()).logits
    assert logits.shape == (1, len(inputs.input_ids), len(tokenizer)) and torch.isfinite(logits).all()

    folder = save_vl_policy(model, tokenizer, processor, tmp_path / "vl")
    again = AutoModelForImageTextToText.from_pretrained(folder).eval()
    reloaded = VisionInputBuilder(AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder),
                                  again.config)
    inputs2 = reloaded.build(tokenizer(record.prompt)["input_ids"], record.images, clip.videos)
    assert inputs2.input_ids == inputs.input_ids and torch.equal(inputs2.pixel_values, inputs.pixel_values)
    with torch.no_grad():
        assert torch.allclose(again(**inputs2.model_kwargs()).logits, logits, atol=1e-5)


def test_dataset_rows_carry_image_files_and_frame_folders_and_bad_ones_are_skipped(vl, tmp_path):
    import json

    from PIL import Image

    from copd_ray.data import encode_prompt, load_records

    tokenizer, _, _, builder = vl
    record, clip = heldout_set("count", 1)[0], heldout_set("motion", 1)[0]
    (tmp_path / "img").mkdir()
    Image.fromarray(record.images[0]).save(tmp_path / "img" / "a.png")
    (tmp_path / "clip").mkdir()
    for i, frame in enumerate(clip.videos[0]):
        Image.fromarray(frame).save(tmp_path / "clip" / f"{i:02d}.png")
    np.save(tmp_path / "clip.npy", np.stack(clip.videos[0]))
    (tmp_path / "clip.mp4").write_bytes(b"not decoded here")
    rows = [{"prompt": "count:", "answer": record.answer, "images": ["img/a.png"]},
            {"prompt": "where:", "answer": clip.answer, "videos": ["clip"]},
            {"prompt": "where:", "answer": clip.answer, "videos": [str(tmp_path / "clip.npy")]},
            {"prompt": "count:", "answer": "2", "images": ["img/missing.png"]},
            {"prompt": "where:", "answer": "up", "videos": ["clip.mp4"]}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records, report = load_records(tmp_path / "data.jsonl", "mixed")
    assert report.kept == 3 and dict(report.skipped) == {
        "missing image file": 1, "video not given as frames (a folder of images or a .npy)": 1}

    image = encode_prompt(records[0], tokenizer, "{prompt}", builder)
    assert torch.equal(image.pixel_values, encode_prompt(record, tokenizer, "{prompt}", builder).pixel_values)
    direct = encode_prompt(clip, tokenizer, "{prompt}", builder)
    for r in records[1:]:
        assert torch.equal(encode_prompt(r, tokenizer, "{prompt}", builder).pixel_values_videos,
                           direct.pixel_values_videos)


# The shape of a Qwen-VL chat template (written here): one vision block per image or video
# part, in the place the part holds among the message's content.
QWEN_VL_STYLE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ={% endif %}"
)


def test_a_chat_template_places_the_pictures_and_each_placeholder_grows_to_its_patches(vl):
    import copy

    from copd_ray.data import PromptRecord, encode_prompt

    tokenizer, model, _, builder = vl
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = QWEN_VL_STYLE
    record = heldout_set("count", 1)[0]
    plain = builder.build(tokenizer(record.prompt)["input_ids"], record.images)
    filled = encode_prompt(record, templated, "{prompt}", builder)
    n = int(plain.image_grid_thw.prod()) // 4
    start, pad, end = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    assert filled.input_ids == [start] + [pad] * n + [end] + tokenizer(record.prompt + " =", add_special_tokens=False)["input_ids"]
    assert filled.token_types == [TEXT] + [IMAGE] * n + [TEXT] * (len(filled) - n - 1)
    assert torch.equal(filled.pixel_values, plain.pixel_values)
    again = encode_prompt(record, templated, "{prompt}", builder)  # the same inputs every time
    assert again.input_ids == filled.input_ids and torch.equal(again.pixel_values, filled.pixel_values)

    # Text first, then the picture, then a video: each block lands where its part is.
    clip = heldout_set("motion", 1)[0]
    parts = [{"type": "text", "text": "count:"}, {"type": "image"}, {"type": "video"}]
    mixed = PromptRecord("m", "3", "image", messages=[{"role": "user", "content": parts}],
                         images=record.images, videos=clip.videos)
    inputs = encode_prompt(mixed, templated, "{prompt}", builder)
    assert inputs.input_ids[:7] == tokenizer("count:", add_special_tokens=False)["input_ids"] + [start]
    assert inputs.token_types.count(IMAGE) == n and inputs.token_types.count(VIDEO) == 2 * n
    assert inputs.token_types.index(VIDEO) > inputs.token_types.index(IMAGE)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs.model_kwargs()).logits).all()

    two = PromptRecord("t", "3", "image", messages=[{"role": "user", "content": parts[:2]}],
                       images=record.images * 2)
    with pytest.raises(ValueError, match="placed 1 of 2 images"):
        encode_prompt(two, templated, "{prompt}", builder)


@pytest.fixture(scope="module")
def vl_folder(vl, tmp_path_factory):
    tokenizer, model, processor, _ = vl
    return save_vl_policy(model, tokenizer, processor, tmp_path_factory.mktemp("vl") / "policy")


def _visual_prompts(builder, tokenizer):
    records = heldout_set("count", 3) + heldout_set("motion", 2) + heldout_set("add", 2)
    return records, [builder.build(tokenizer(r.prompt)["input_ids"], r.images, r.videos) for r in records]


def test_the_engine_scores_with_pixels_in_context_as_a_direct_forward_does(vl):
    from copd_ray.engines import HFEngine, SamplingParams
    from copd_ray.models.vl_inputs import ban_tokens, vision_token_ids

    tokenizer, model, _, builder = vl
    _, prompts = _visual_prompts(builder, tokenizer)  # images, videos and plain text, of three lengths
    engine = HFEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    samples = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=0))
    banned = vision_token_ids(model.config)
    assert not any(t in banned for s in samples for t in s.token_ids)  # a policy never writes vision tokens
    sequences = [prompts[s.prompt_index] + s.token_ids for s in samples]
    scores = engine.score(sequences, [len(prompts[s.prompt_index]) for s in samples])
    for seq, sample, scored in zip(sequences, samples, scores.logprobs):
        p = len(prompts[sample.prompt_index])
        with torch.no_grad():
            logp = torch.log_softmax(ban_tokens(model(**seq.model_kwargs()).logits[0].float(), banned), dim=-1)
        direct = [logp[t - 1, seq.input_ids[t]].item() for t in range(p, len(seq))]
        assert scored == pytest.approx(direct, abs=1e-5)
        assert sample.logprobs == pytest.approx(direct, abs=1e-5)  # sampling saw the same distribution
    # Each prompt's pixels and tokens are read once for its two samples: the same samples as
    # the prompts written out twice.
    twice = engine.generate([p for p in prompts for _ in range(2)],
                            SamplingParams(n=1, temperature=1.0, max_new_tokens=6, seed=0))
    assert [s.token_ids for s in twice] == [s.token_ids for s in samples]

    greedy = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    for prompt, sample in zip(prompts, greedy):
        reference = model.generate(**prompt.model_kwargs(), max_new_tokens=6, do_sample=False, suppress_tokens=banned)
        assert sample.token_ids == reference[0, len(prompt):].tolist()[: len(sample.token_ids)]


def test_a_teacher_scores_a_students_image_rollouts_and_the_student_trains_on_them(ray_session, vl, vl_folder,
                                                                                   tmp_path):
    import ray

    from conftest import SMALL_ACTORS, sample, started_branch, train_on
    from copd_ray.actors import TrainBatch
    from copd_ray.config import load_config
    from copd_ray.engines import HFEngine, SamplingParams

    tokenizer, _, _, builder = vl
    records, prompts = _visual_prompts(builder, tokenizer)
    cfg = load_config(None, [*SMALL_ACTORS, "model.tiny.vision=true"])
    with started_branch("image", cfg, vl_folder, "test-vl") as student, \
            started_branch("text", cfg, vl_folder, "test-vl", frozen=True) as teacher:  # a scorer is all it needs
        out = sample(student, prompts, SamplingParams(n=2, max_new_tokens=5, seed=1), [r.answer for r in records],
                     ["exact_match"] * len(records))
        sequences, plens = out.sequences(), out.prompt_lengths.tolist()
        scores = ray.get(teacher.scorer.score.remote(sequences, plens))
        model, _ = __import__("copd_ray.models", fromlist=["load_policy"]).load_policy(str(vl_folder))
        direct = HFEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id).score(sequences, plens)
        assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(scores.logprobs, direct.logprobs))

        batch = TrainBatch.of(2, sequences, plens, [float(i % 2) for i in range(len(sequences))],
                           opd_sequences=sequences[:4], opd_prompt_lengths=plens[:4],
                           opd_teacher_logprobs=scores.logprobs[:4])
        trained = train_on(student, batch)
        assert trained["nan_skipped"] == 0 and trained["sequences"] == len(sequences) + 4
        assert student.sync()["version"] == 1
        moved = ray.get(student.scorer.score.remote(sequences[:2], plens[:2]))
        assert moved.version == 1 and moved.logprobs != scores.logprobs[:2]

        # A checkpoint of the vision-language student resumes exactly (its tensor names on
        # disk differ from those at run time).
        folder = student.save(str(tmp_path / "ckpt"))
        train_on(student, batch)
        student.load(folder, 1)
        again = ray.get(student.scorer.score.remote(sequences[:2], plens[:2]))
        assert all(a == pytest.approx(b, abs=1e-6) for a, b in zip(again.logprobs, moved.logprobs))


def test_three_visual_branches_hub_and_spoke_one_cycle_then_the_merge_answers_an_image_question(
        warm_pool, vl_folder, tmp_path):
    """On the session's warm actors (they held text policies before: a reload takes any folder)."""
    import json

    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from conftest import TINY_COMPARE
    from copd_ray.config import load_config
    from copd_ray.driver import train
    from copd_ray.engines import HFEngine, SamplingParams
    from copd_ray.models.vl_inputs import VisionInputBuilder

    out = tmp_path / "mm"
    cfg = load_config("configs/demo_multimodal.yaml", TINY_COMPARE[:8] + [
        f"model.path={vl_folder}", f"output_dir={out}", "schedule.cycles=1", "schedule.rl_steps=1",
        "schedule.opd_steps=1", "eval.every=2", "eval.during_training_size=10", "metrics.pair_every=2",
        "metrics.pair_sequences=4"] + [f"capabilities.{i}.{k}=12" for i in range(3) for k in ("heldout_size",
                                                                                            "validation_size")])
    summary = train(cfg, pool=warm_pool)
    assert set(summary["eval"]) == {"base", "branch:text", "branch:image", "branch:video", "merged"}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    teachers = {r["branch"]: sorted(k.split("/")[1] for k in r if k.endswith("/teacher_version"))
                for r in steps if r["kind"] == "step" and r["phase"] == "opd"}
    assert teachers == {"text": ["image", "video"], "image": ["text"], "video": ["text"]}
    pairs = [r for r in steps if r["kind"] == "pair"]
    assert {(p["teacher"], p["student"]) for p in pairs} == {("text", "image"), ("text", "video"), ("image", "text"),
                                                             ("video", "text")}
    assert all(0 <= p["topk_overlap"] <= 1 and p["symmetric_kl"] >= 0 for p in pairs)

    merged = AutoModelForImageTextToText.from_pretrained(out / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    builder = VisionInputBuilder.for_folder(str(out / "merged"))
    record = heldout_set("count", 1)[0]
    engine = HFEngine(merged, tokenizer.eos_token_id, tokenizer.pad_token_id)
    answer = engine.generate([builder.build(tokenizer(record.prompt)["input_ids"], record.images)],
                             SamplingParams(n=1, temperature=0.0, max_new_tokens=4))[0]
    assert answer.token_ids and all(t < len(tokenizer) for t in answer.token_ids)


def test_the_vision_warm_up_trains_on_pixels_and_caches_a_loadable_folder(tmp_path):
    from transformers import AutoModelForImageTextToText

    from copd_ray.config import load_config
    from copd_ray.bootstrap import ensure_base_policy

    cfg = load_config("configs/demo_multimodal.yaml", [
        f"cache_dir={tmp_path}", "bootstrap.max_steps=2", "bootstrap.batch_size=8", "bootstrap.eval_every=1",
        "model.tiny.num_layers=1"] + [f"capabilities.{i}.{k}=10" for i in range(3) for k in ("heldout_size",
                                                                                           "validation_size")])
    folder, record = ensure_base_policy(cfg)
    assert set(record["rates"]) == {"text", "image", "video"} and record["steps"] in (1, 2)
    AutoModelForImageTextToText.from_pretrained(folder)
    assert VisionInputBuilder.for_folder(str(folder)) is not None
    assert ensure_base_policy(cfg)[1]["cached"]


def test_image_capabilities_refuse_http_scoring_before_any_actor_starts(vl_folder, tmp_path):
    from copd_ray.config import load_config
    from copd_ray.driver import train
    from copd_ray.run_data import BranchDataError

    cfg = load_config("configs/demo_multimodal.yaml", [
        f"model.path={vl_folder}", f"output_dir={tmp_path / 'o'}", "serve.enabled=true", "topology.transport=serve"])
    with pytest.raises(BranchDataError, match=r"\['image', 'video'\] have images or videos, and the HTTP scoring"):
        train(cfg)
