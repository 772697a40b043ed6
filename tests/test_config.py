import re
from pathlib import Path

import pytest

from conftest import REPO
from copd_ray.config import Config, ConfigError, load_config


def test_demo_yaml_is_the_embedded_default():
    assert load_config(REPO / "configs" / "demo.yaml") == Config() == load_config()


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["bootstrap.lr=5e-4", "capabilities.1.reward=math", "model.tiny.num_layers=2", "run_name=x"])
    assert cfg.bootstrap.lr == 5e-4 and isinstance(cfg.bootstrap.lr, float)
    assert cfg.capabilities[1].reward == "math" and cfg.model.tiny.num_layers == 2 and cfg.run_name == "x"


def test_a_whole_list_can_be_overridden():
    cfg = load_config(None, ["capabilities=[{name: a, source: 'synthetic:add'}]"])
    assert [c.name for c in cfg.capabilities] == ["a"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("bootstrap.lrr=1", "bootstrap.lrr: Extra inputs are not permitted"),
        ("bootstrap.lr=-1", "bootstrap.lr: Input should be greater than 0"),
        ("capabilities.0.reward=bleu", "unknown reward 'bleu'"),
        ("capabilities.0.source=synthetic:div", "unknown synthetic task 'div'"),
        ("capabilities.0.source=/no/such.jsonl", "dataset /no/such.jsonl does not exist"),
        ("capabilities.1.name=add", "capability names repeat"),
        ("capabilities.5.name=z", "capabilities.5 is not an index of a list of 2"),
        ("model.path=/no/model", "model folder /no/model does not exist"),
        ("model.tiny.num_heads=3", "not divisible by num_heads 3"),
        ("bootstrap.aim=0.9", "need low <= aim <= high"),
        ("engine.kind=tensorrt", "engine.kind"),
        ("engine.scorer_kind=sglang", "engine 'sglang' is not installed"),
        ("capabilities.0.template='Q {x}'", "must contain '{prompt}'"),
        ("novalue", "not of the form key=value"),
        ("grpo.lr=.inf", "grpo.lr: Input should be a finite number"),
        ("grpo.grad_clip=.inf", "grpo.grad_clip: Input should be a finite number"),
        ("opd.beta=.inf", "opd.beta: Input should be a finite number"),
        ("bootstrap.low=.nan", "bootstrap.low: Input should be a finite number"),
        ("schedule.cycles=true", "schedule.cycles: a number is needed, not the boolean true"),
        ("grpo.lr=false", "grpo.lr: a number is needed, not the boolean false"),
        ("merge.weights={add: true, mul: 1}", "merge.weights.add: a number is needed, not the boolean true"),
        ("serve.token=''", "serve.token: is empty"),
        ("serve.token=", "override 'serve.token=' has no value: give one, or write serve.token=null for none"),
        ("resume=/no/checkpoint", "resume: /no/checkpoint is not a folder: give auto, never or a checkpoint folder"),
        ("grpo.lr=[1", "override 'grpo.lr=[1' is not valid YAML"),
        ("capabilities.0.reward=os:getcwd", "reward 'os:getcwd' must take (response, answer)"),
        ("capabilities.0.reward=no_such_module:f", "reward 'no_such_module:f' cannot be imported"),
    ],
)
def test_bad_configs_name_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_numbers_keep_their_yaml_forms():
    cfg = load_config(None, ["grpo.lr=1e-4", "bootstrap.lr=5.0e-4", "schedule.cycles=3", "resources.trainer_cpus=1"])
    assert (cfg.grpo.lr, cfg.bootstrap.lr, cfg.schedule.cycles, cfg.resources.trainer_cpus) == (1e-4, 5e-4, 3, 1.0)
    assert load_config(None, ["model.tiny.vision=true", "capabilities.1.source=synthetic:count"]).model.tiny.vision


def test_a_custom_reward_is_checked_when_the_config_is_read(tmp_path, monkeypatch):
    (tmp_path / "config_rewards.py").write_text(
        "def good(response, answer, *, strict=False):\n    return float(response == answer)\n\n"
        "def bad(response):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_config(None, ["capabilities.0.reward=config_rewards:good"]).capabilities[0].reward == "config_rewards:good"
    with pytest.raises(ConfigError, match=re.escape("capabilities.0.reward: reward 'config_rewards:bad' must take "
                                                    "(response, answer): too many positional arguments")):
        load_config(None, ["capabilities.0.reward=config_rewards:bad"])


def test_output_dir_must_be_writable(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"output_dir {tmp_path}/file/run cannot be created: {tmp_path}/file is a file"):
        load_config(None, [f"output_dir={tmp_path}/file/run"])
    cfg = load_config(None, [f"output_dir={tmp_path}/new/run"])
    assert cfg.output_dir == f"{tmp_path}/new/run" and list(tmp_path.iterdir()) == [tmp_path / "file"]  # nothing made


def test_a_dataset_of_another_format_fails_at_load(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(ConfigError, match=f"dataset {tmp_path}/d.csv: unsupported format"):
        load_config(None, [f"capabilities.0.source={tmp_path}/d.csv"])


def test_check_paths_off_checks_the_config_not_this_machine(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    (tmp_path / "file").write_text("")
    machine = ["engine.kind=vllm", "resume=/no/checkpoint", f"output_dir={tmp_path}/file/run", "model.path=/no/model"]
    cfg = load_config(None, machine, check_paths=False)
    assert cfg.engine.kind == "vllm" and cfg.resume == "/no/checkpoint"
    with pytest.raises(ConfigError, match="engine 'vllm' is not installed"):
        load_config(None, ["engine.kind=vllm"])
    with pytest.raises(ConfigError, match="schedule.cycles"):  # the config itself is still checked
        load_config(None, [*machine, "schedule.cycles=true"], check_paths=False)


def test_a_yaml_file_with_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: mine\nbootstrap:\n  max_steps: 10\n")
    cfg = load_config(path, ["bootstrap.max_steps=20"])
    assert cfg.run_name == "mine" and cfg.bootstrap.max_steps == 20
    assert [c.name for c in cfg.capabilities] == ["add", "mul"]  # unspecified sections keep defaults
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("run_name: a\nbootstrap: {max_steps: 10\n")
    with pytest.raises(ConfigError, match=r"^config file .*broken.yaml is not valid YAML: .* at line 3, column 1$"):
        load_config(tmp_path / "broken.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["topology.kind=hub_and_spoke", "topology.hub=text"], "topology.hub 'text' is not a branch"),
        (["topology.hub=add"], "topology.hub is only for kind=hub_and_spoke"),
        (["topology.kind=edges"], "needs topology.edges"),
        (["capabilities.1.source=synthetic:count"], "set model.tiny.vision=true"),
        (["capabilities.1.source=synthetic:motion", "model.tiny.vision=true", "engine.kind=vllm"],
         "engine 'vllm' is not tested with the embedded tiny vision policy"),
        (["topology.kind=none", "topology.edges=[[add, mul]]"], "topology.edges is only for kind=edges"),
        (["topology.kind=edges", "topology.edges=[[add, video]]"], "'video' is not a branch"),
        (["branches=[{name: mixed, data: [add, sub]}]"], "unknown capability 'sub'"),
        (["branches=[{name: a}, {name: a, data: [add]}]"], "branch names repeat"),
        (["merge.weights={add: 1.0}"], "merge.weights must name every trainable branch"),
        (["schedule.rl_steps=0", "schedule.opd_steps=0"], "rl_steps + opd_steps must be > 0"),
        (["schedule.cycles=zero"], "schedule.cycles: Input should be a valid integer"),
        (["resources.num_trainers=2", "ray.sync_transport=ray"], "use ray.sync_transport=auto"),
        (["resources.num_trainers=2", "resources.trainer_gpus=0.5"], "give each rank a whole GPU"),
    ],
)
def test_bad_wiring_fails_naming_the_key(overrides, message):
    # check_paths=False: the wiring, not this machine (whether vLLM is installed) is checked.
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides, check_paths=False)


def test_mixed_branch_and_hub_config():
    cfg = load_config(None, ["branches=[{name: mixed, data: [add, mul]}]"])
    assert [b.name for b in cfg.branch_list()] == ["mixed"] and cfg.branch_data(cfg.branch_list()[0]) == ["add", "mul"]
    hub = load_config(None, ["topology.kind=hub_and_spoke", "topology.hub=mul"])
    assert hub.topology.hub == "mul"
