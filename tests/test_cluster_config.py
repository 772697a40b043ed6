"""cluster.yaml against Ray's own cluster-config validator, and the paper's GPU configs.

The paper configs run vLLM, but reading them with check_paths=False checks the config, not
this machine: they load here whether vLLM is installed or not, and both cases are tried.
"""

import copy
import importlib.machinery
import importlib.util

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO
from copd_ray.config import load_config


def test_cluster_yaml_passes_rays_validator():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does; raises on a violation
    workers = config["available_node_types"]["worker.8xh100"]
    assert workers["min_workers"] >= 1 and config["head_node_type"] in config["available_node_types"]
    assert any("copd-ray[vllm]" in c for c in config["setup_commands"])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["worker.8xh100"]["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(broken))


@pytest.fixture(params=["vllm installed", "vllm not installed"])
def vllm_presence(request, monkeypatch):
    real = importlib.util.find_spec
    stand_in = None if request.param == "vllm not installed" else importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: stand_in if name == "vllm" else real(name, *a))
    return request.param


def test_paper_two_branch_config(vllm_presence):
    cfg = load_config(REPO / "configs" / "paper_two_branch.yaml", check_paths=False)
    assert [b.name for b in cfg.branch_list()] == ["text", "image"]
    assert cfg.topology.kind == "pairwise" and cfg.engine.kind == "vllm" and "Qwen3-VL-4B" in cfg.model.path
    g = cfg.grpo
    assert (g.prompts_per_step, g.group_size, g.temperature, g.lr, g.clip_low, g.clip_high) == (256, 8, 1.0, 1e-6, 0.2, 0.28)
    assert g.max_new_tokens == 16384 and cfg.engine.vllm.max_model_len == 32768
    assert cfg.resources.trainer_gpus > 0 and cfg.ray.sync_backend == "nccl"


def test_paper_hub_and_spoke_config(vllm_presence):
    cfg = load_config(REPO / "configs" / "paper_hub_and_spoke.yaml", check_paths=False)
    assert [b.name for b in cfg.branch_list()] == ["text", "image", "video"]
    assert cfg.topology.kind == "hub_and_spoke" and cfg.topology.hub == "text"


def test_paths_are_checked_unless_asked_not_to():
    from copd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        load_config(REPO / "configs" / "paper_two_branch.yaml")
