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
    ],
)
def test_bad_configs_name_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["topology.kind=hub_and_spoke", "topology.hub=text"], "topology.hub 'text' is not a branch"),
        (["topology.hub=add"], "topology.hub is only for kind=hub_and_spoke"),
        (["topology.kind=edges"], "needs topology.edges"),
        (["capabilities.1.source=synthetic:count"], "set model.tiny.vision=true"),
        (["capabilities.1.source=synthetic:motion", "model.tiny.vision=true", "engine.kind=vllm"],
         "does not take images or videos yet"),
        (["topology.kind=none", "topology.edges=[[add, mul]]"], "topology.edges is only for kind=edges"),
        (["topology.kind=edges", "topology.edges=[[add, video]]"], "names 'video', which is not a branch"),
        (["branches=[{name: mixed, data: [add, sub]}]"], "unknown capability 'sub'"),
        (["branches=[{name: a}, {name: a, data: [add]}]"], "branch names repeat"),
        (["merge.weights={add: 1.0}"], "merge.weights must name every trainable branch"),
        (["schedule.rl_steps=0", "schedule.opd_steps=0"], "rl_steps + opd_steps must be > 0"),
        (["schedule.cycles=zero"], "schedule.cycles: Input should be a valid integer"),
    ],
)
def test_bad_wiring_fails_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_mixed_branch_and_hub_config():
    cfg = load_config(None, ["branches=[{name: mixed, data: [add, mul]}]"])
    assert [b.name for b in cfg.branch_list()] == ["mixed"] and cfg.branch_data(cfg.branch_list()[0]) == ["add", "mul"]
    hub = load_config(None, ["topology.kind=hub_and_spoke", "topology.hub=mul"])
    assert hub.topology.hub == "mul"
