"""`copd-ray plan`: the estimate's arithmetic against hand computations, parameter counts
against models transformers builds, the table, a config that does not fit (the actor and
the setting that fixes it, exit code 1), and the paper configs on cluster.yaml's nodes."""

import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import REPO
from copd_ray.cli import app
from copd_ray.config import load_config
from copd_ray.plan import (ACT_BYTES, GiB, INSTANCE_TYPES, architecture, architecture_from_hf, plan_memory,
                           read_cluster)

PAPER = [REPO / "configs" / "paper_two_branch.yaml", REPO / "configs" / "paper_hub_and_spoke.yaml"]
CLUSTER = REPO / "cluster.yaml"


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight once


def _blocks(model):
    return next(m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n.endswith("layers")
                and "visual" not in n)


def _small_models():
    """Small real models of every family the plan counts in closed form."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM, Qwen3VLConfig, Qwen3VLForConditionalGeneration)

    from copd_ray.models.tiny import build_char_tokenizer, build_tiny_policy
    from copd_ray.models.tiny_vl import build_tiny_vl_policy, build_vl_tokenizer

    torch.manual_seed(0)
    yield "tiny llama", build_tiny_policy(build_char_tokenizer())
    yield "tiny qwen2-vl", build_tiny_vl_policy(build_vl_tokenizer())
    yield "llama with biases", LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False))
    yield "qwen2", Qwen2ForCausalLM(Qwen2Config(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    yield "qwen3", Qwen3ForCausalLM(Qwen3Config(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, tie_word_embeddings=False))
    yield "qwen3-vl", Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4,
                           out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0, 2]),
        tie_word_embeddings=True))


def test_parameter_count_is_exact_for_every_family():
    for name, model in _small_models():
        arch = architecture_from_hf(model.config, name)
        assert not arch.counted_on_meta, name
        assert arch.params == _count(model), name
        assert arch.block_params == _count(_blocks(model)[0]), name
        vision = getattr(getattr(model, "model", model), "visual", None)
        assert arch.vision_params == (_count(vision) if vision is not None else 0), name


def test_the_paper_model_is_qwen3_vl_4b():
    cfg = load_config(PAPER[0], check_paths=False)
    arch = architecture(cfg)  # model.path is not here: the shipped config.json
    assert "configs/models/qwen3-vl-4b/config.json" in arch.source and "not on this machine" in arch.source
    # What transformers builds from that config (on the meta device): 4,437,815,808, 415,347,712 of them vision.
    assert (arch.params, arch.vision_params) == (4_437_815_808, 415_347_712)
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim, arch.vocab) == (36, 2560, 32, 8, 128,
                                                                                                151_936)
    assert arch.kv_bytes_per_token(2) == 2 * 36 * 8 * 128 * 2


def test_where_the_architecture_comes_from(tmp_path):
    """model.path's config.json (weights not needed), --model-config over it, an unknown path refused."""
    from copd_ray.plan import PlanError

    _, model = next(_small_models())
    model.config.save_pretrained(tmp_path)  # config.json only
    cfg = load_config(None, [f"model.path={tmp_path}"])
    arch = architecture(cfg)
    assert arch.params == _count(model) and arch.source == f"{tmp_path / 'config.json'}"
    qwen = architecture(cfg, REPO / "configs" / "models" / "qwen3-vl-4b")
    assert qwen.params == 4_437_815_808 and "--model-config" in qwen.source
    with pytest.raises(PlanError, match="--model-config"):
        architecture(load_config(None, ["model.path=/cluster/models/SomethingElse-7B"], check_paths=False))


def test_an_unknown_family_is_counted_on_the_meta_device():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    arch = architecture_from_hf(config, "gpt2")
    assert arch.counted_on_meta and arch.params == _count(GPT2LMHeadModel(config))


SMALL = ["grpo.prompts_per_step=4", "grpo.group_size=2", "grpo.minibatches=1", "grpo.max_new_tokens=8",
         "opd.prompts_per_teacher=2", "opd.samples_per_prompt=2", "resources.num_generators=1"]


def _rows(plan, branch, role):
    return [r for r in plan.rows if r.branch == branch and r.role == role]


def _phases(cfg, prompt_tokens=24, on_gpu=False):
    from copd_ray.plan.estimate import _teachers, _trainer_knobs, _workload, trainer_phases

    arch = architecture(cfg)
    teachers = _teachers(cfg)
    students = sum("add" in t for t in teachers.values())
    w = _workload(cfg, teachers["add"], students, prompt_tokens)
    return trainer_phases(cfg, arch, w, _trainer_knobs(cfg), on_gpu)[0]


def test_trainer_arithmetic_by_hand():
    """The tiny Llama (hidden 128, 4 layers, 4 heads of 32, MLP 256, vocabulary 52, float32) and
    a step of 4 x 2 native + 2 x 2 cross-branch rows of 24 + 8 tokens, phase by phase."""
    cfg = load_config(None, SMALL)
    plan = plan_memory(cfg, prompt_tokens=24, host_memory_gb=1000)
    arch = plan.arch
    P = 128 * 52 + 4 * (4 * 128 * 128 + 3 * 128 * 256 + 2 * 128) + 128  # embedding (tied), 4 blocks, final norm
    assert arch.params == P
    root, embed = 128 * 52 + 128, 128 * 52
    rows, seq = 4 * 2 + 2 * 2, 24 + 8  # Phase II: the native batch and one teacher's
    tokens = rows * seq  # one minibatch, one micro-batch
    block = 24 * 128 + 12 * 128 + 8 * 128 + 16 * 256  # bytes a token: hidden, q, kv, MLP (float32)
    acts = tokens * (4 + 0.2) * block + tokens * 5 * 128 * 4 + rows * seq * seq  # + outside blocks + the mask
    phases = _phases(cfg)
    # One micro-batch: gradients are None until backward, which starts with the output layer's.
    assert phases["backward"] == dict(weights=4 * P, grads=4 * root, optimizer=8 * P, activations=int(acts),
                                      logprobs=min(2048, rows * 8) * 52 * 12)  # 3 float32 copies a position
    assert phases["backward's end"] == dict(weights=4 * P, grads=4 * P + int(4 * (3.5 * embed + 128)), optimizer=8 * P,
                                            activations=0, logprobs=0)
    # Old log-probs: all of the rank's rows, one block's working set, 4 float32 copies (entropy); last step's grads.
    assert phases["old log-probs"] == dict(weights=4 * P, grads=4 * P, optimizer=8 * P,
                                           activations=tokens * (block + 5 * 128 * 4) + rows * seq * seq,
                                           logprobs=rows * 8 * 52 * 16)
    assert phases["optimizer step"] == dict(weights=4 * P, grads=4 * P, optimizer=int(8 * P + 2.5 * 4 * embed),
                                            activations=0, logprobs=0)
    t = _rows(plan, "add", "trainer")[0]
    assert {k: t.parts[k] for k in phases["backward"]} == phases["backward"]
    assert "peak: backward" in t.detail
    assert t.parts["other"] == 0.5 * GiB  # CPU: the process itself
    assert t.need == sum(t.parts.values()) and t.have is None and t.where.startswith("host memory")

    ckpt = load_config(None, SMALL + ["train.gradient_checkpointing=true"])
    assert _phases(ckpt)["backward"]["activations"] == int(tokens * (4 * 128 * 4 + 1.2 * block) + tokens * 5 * 128 * 4
                                                           + rows * seq * seq)

    # A token budget of 2 rows: 2 x 32 tokens a micro-batch, 6 of them: gradients accumulate.
    micro = load_config(None, SMALL + ["train.max_tokens_per_microbatch=70"])
    phases = _phases(micro)
    assert phases["backward"]["activations"] == int(64 * 4.2 * block + 64 * 5 * 128 * 4 + 2 * seq * seq)
    assert phases["backward"]["grads"] == 4 * P + 4 * root
    assert phases["old log-probs"]["logprobs"] == 2 * 8 * 52 * 16
    t = _rows(plan_memory(micro, prompt_tokens=24), "add", "trainer")[0]
    assert "micro-batch 2 x 32 tokens of a 12-row minibatch" in t.detail
    # The parts are the largest phase's.
    assert sum(t.parts.values()) - t.parts["other"] == max(sum(ph.values()) for ph in phases.values())

    # On a GPU AdamW's foreach step holds a float32 copy of every exp_avg_sq at once.
    assert _phases(cfg, on_gpu=True)["optimizer step"]["optimizer"] == 8 * P + 4 * P


def test_sharded_ranks_hold_one_nth():
    """FSDP2 over N ranks: float32 weights, gradients and AdamW state 1/N each, plus two
    unsharded blocks and the root (embedding, final norm) with their gradients."""
    base = load_config(None, SMALL)
    one = _rows(plan_memory(base, prompt_tokens=24), "add", "trainer")[0]
    for n in (2, 4):
        cfg = load_config(None, SMALL + [f"resources.num_trainers={n}"])
        plan = plan_memory(cfg, prompt_tokens=24)
        ranks = _rows(plan, "add", "trainer")
        assert len(ranks) == n and all(r.parts == ranks[0].parts for r in ranks)
        arch, r = plan.arch, ranks[0]
        shard = math.ceil(arch.params / n)
        block, root = 4 * 128 * 128 + 3 * 128 * 256 + 2 * 128, 128 * 52 + 128
        assert (arch.block_params, arch.root_params) == (block, root)
        phases = _phases(cfg)
        gathered = 4 * (2 * block + root)  # float32 model: gathered in float32
        assert phases["backward"]["weights"] == 4 * shard + gathered
        assert phases["backward"]["grads"] == gathered  # one micro-batch: no sharded gradient yet
        assert phases["backward's end"]["weights"] == 4 * shard + 4 * root
        for ph in phases.values():
            assert ph["optimizer"] >= 8 * shard
        assert phases["old log-probs"]["grads"] == 4 * shard
        assert phases["old log-probs"]["optimizer"] == pytest.approx(one.parts["optimizer"] / n, abs=8)
        rows = math.ceil(12 / n)  # rows a rank
        assert f"micro-batch {rows} x 32 tokens" in r.detail and f"FSDP2 over {n} ranks" in r.detail

    # bf16: sharded ranks run their blocks in bf16 (20 bytes a token per hidden unit, not 26 under autocast).
    assert ACT_BYTES["sharded"]["hidden"] < ACT_BYTES["autocast"]["hidden"]
    bf16 = load_config(None, SMALL + ["model.dtype=bfloat16", "resources.num_trainers=2"])
    arch = architecture(bf16)
    phases = _phases(bf16)
    assert phases["backward"]["weights"] == 4 * math.ceil(arch.params / 2) + 2 * (2 * arch.block_params
                                                                                + arch.root_params)


def test_kl_reference_and_autocast_copies():
    plain = _rows(plan_memory(load_config(None, SMALL + ["model.dtype=bfloat16"]), prompt_tokens=24), "add", "trainer")
    kl = _rows(plan_memory(load_config(None, SMALL + ["model.dtype=bfloat16", "grpo.kl_coef=0.1"]), prompt_tokens=24),
               "add", "trainer")
    P = plain[0].parts["optimizer"] // 8
    assert plain[0].parts["weights"] == 4 * P + 2 * P  # float32 master + autocast's bf16 copies
    assert kl[0].parts["weights"] == plain[0].parts["weights"] + 2 * P  # a bf16 reference model
    assert "reference model" in kl[0].detail


def test_gpu_bundles_and_frozen_branches(tmp_path):
    """A frozen branch is its scorer alone; GPU actors get resources.*_gpus of the GPU."""
    cfg = load_config(None, SMALL + [
        "branches=[{name: add}, {name: mul, frozen: true, init: /nowhere}]", "topology.kind=edges",
        "topology.edges=[[mul, add]]", "resources.trainer_gpus=0.5", "resources.generator_gpus=0.25",
        "resources.scorer_gpus=0.25", "ray.sync_backend=nccl"], check_paths=False)
    plan = plan_memory(cfg, gpu_memory_gb=10, prompt_tokens=24)
    assert [r.actor for r in plan.rows if r.branch == "mul"] == ["scorer"]
    assert [r.actor for r in plan.rows if r.branch == "add"] == ["trainer 0", "generator 0", "scorer"]
    t = _rows(plan, "add", "trainer")[0]
    assert t.have == int(0.5 * 10 * GiB) and t.parts["other"] > 1.0 * GiB  # CUDA context + allocator margin
    assert _rows(plan, "mul", "scorer")[0].have == int(0.25 * 10 * GiB)
    assert plan.fits


def test_instance_types_come_from_the_cluster_yaml(tmp_path):
    clus = read_cluster(CLUSTER)
    workers = next(n for n in clus.node_types if n.name == "worker.8xh100")
    assert (workers.gpus, workers.gpu_bytes) == (8, int(INSTANCE_TYPES["p5.48xlarge"].gpu_gib * GiB))
    assert sum(n.gpus for n in clus.node_types if n.head) == 0  # no GPU bundle lands on the head
    # A head with a small GPU: every GPU bundle is checked against the smaller GPU, and said so.
    tree = yaml.safe_load(CLUSTER.read_text())
    head = tree["head_node_type"]
    tree["available_node_types"][head]["node_config"]["InstanceType"] = "g5.2xlarge"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    plan = plan_memory(load_config(PAPER[0], check_paths=False), cluster=tmp_path / "c.yaml")
    assert not plan.fits and all(r.have <= 22.5 * GiB for r in plan.rows)
    assert any("smallest GPU" in n for n in plan.notes)
    # An instance type the table does not know: nothing can be checked, and the output says how to.
    tree["available_node_types"]["worker.8xh100"]["node_config"]["InstanceType"] = "x9.mystery"
    (tmp_path / "u.yaml").write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["plan", str(PAPER[0]), "--cluster", str(tmp_path / "u.yaml")])
    assert result.exit_code == 0 and "x9.mystery" in result.output and "--gpu-memory-gb" in result.output


@pytest.mark.parametrize("path", PAPER, ids=["two_branch", "hub_and_spoke"])
def test_the_paper_configs_fit_the_cluster(path):
    cfg = load_config(path, check_paths=False)
    plan = plan_memory(cfg, cluster=CLUSTER)
    assert plan.fits, plan.problems()
    r = cfg.resources
    for b in cfg.branch_list():
        roles = [row.role for row in plan.rows if row.branch == b.name]
        assert roles == ["trainer"] * r.num_trainers + ["generator"] * r.num_generators + ["scorer"]
    assert all(row.fits for row in plan.rows) and all(c.fits for c in plan.checks)
    result = CliRunner().invoke(app, ["plan", str(path), "--cluster", str(CLUSTER)])
    assert result.exit_code == 0, result.output
    assert "every actor fits" in result.output and "text trainers 0-3" in result.output


def test_a_config_that_does_not_fit_names_the_actor_and_the_knob():
    result = CliRunner().invoke(app, ["plan", str(PAPER[0]), "train.gradient_checkpointing=false",
                                      "--cluster", str(CLUSTER)])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "does not fit: text trainers 0-3: needs" in out and "does not fit: image trainers 0-3" in out
    assert "train.gradient_checkpointing=true" in out
    trainer = _rows(plan_memory(load_config(PAPER[0], ["train.gradient_checkpointing=false"], check_paths=False),
                                cluster=CLUSTER), "text", "trainer")[0]
    assert trainer.fits is False and trainer.fix
    for fix in trainer.fix:  # each fixes it alone
        fixed = plan_memory(load_config(PAPER[0], ["train.gradient_checkpointing=false"] + fix.split(" and "),
                                        check_paths=False), cluster=CLUSTER)
        assert _rows(fixed, "text", "trainer")[0].fits, fix
    # Nothing alone fixes a 4B model on a 24 GiB GPU: settings together, or none.
    small_gpu = _rows(plan_memory(load_config(PAPER[0], ["train.gradient_checkpointing=false"], check_paths=False),
                                  gpu_memory_gb=24), "text", "trainer")[0]
    assert small_gpu.fits is False and len(small_gpu.fix) == 1 and " and " in small_gpu.fix[0]
    assert "NO" in out and "text generators 0-2" in out  # the table is printed too

    # A vLLM engine whose share of a small GPU holds no full-length sequence: the knobs that fix it.
    small = ["engine.vllm.gpu_memory_utilization=0.6", "grpo.max_new_tokens=4096"]
    plan = plan_memory(load_config(PAPER[0], small, check_paths=False), gpu_memory_gb=24)
    gen = _rows(plan, "text", "generator")[0]
    assert gen.fits is False and gen.have == int(0.6 * 24 * GiB) and gen.need > gen.have
    assert {f.split("=")[0] for f in gen.fix} >= {"engine.vllm.gpu_memory_utilization", "engine.vllm.max_model_len"}
    for fix in gen.fix:  # each fixes it alone
        fixed = plan_memory(load_config(PAPER[0], small + fix.split(" and "), check_paths=False), gpu_memory_gb=24)
        assert _rows(fixed, "text", "generator")[0].fits, fix

    # Fractional GPUs: vLLM asks for more of the GPU than its bundle's share.
    plan = plan_memory(load_config(PAPER[0], ["resources.generator_gpus=0.5"], check_paths=False), cluster=CLUSTER)
    gen = _rows(plan, "text", "generator")[0]
    assert gen.fits is False and "engine.vllm.gpu_memory_utilization=0.5" in gen.fix


def test_the_table_prints_for_the_embedded_default():
    result = CliRunner().invoke(app, ["plan", "--host-memory-gb", "64", "grpo.max_new_tokens=16"])
    assert result.exit_code == 0, result.output
    for text in ("add trainer 0", "add generator 0", "mul scorer", "weights", "activ", "host memory",
                 "the embedded tiny policy", "every actor fits"):
        assert text in result.output, text
    small = CliRunner().invoke(app, ["plan", "--host-memory-gb", "1"])
    assert small.exit_code == 1 and "host memory" in small.output
