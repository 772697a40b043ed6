"""Each bad input a user can give: the real CLI ends with one line that names it (no
traceback), the exit code says config (2) or not (1), and nothing has started Ray."""

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from copd_ray.cli import app


@pytest.fixture
def copd_ray(monkeypatch):
    """`copd-ray ARGS` in-process, with ray.init made to fail the test if anything calls it."""
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)

    def run(*args: str, code: int):
        start = time.perf_counter()
        result = CliRunner().invoke(app, list(args))
        seconds = time.perf_counter() - start
        assert result.exit_code == code, (result.output, result.exception)
        assert "Traceback" not in result.output and seconds < 60, (result.output, seconds)
        return result

    return run


def one_line(result) -> str:
    """The error, alone on stderr."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("override, message", [
    ("grpo.lrr=1", "invalid config: grpo.lrr: Extra inputs are not permitted"),
    ("grpo.lr=.inf", "invalid config: grpo.lr: Input should be a finite number"),
    ("opd.beta=.inf", "invalid config: opd.beta: Input should be a finite number"),
    ("schedule.cycles=true", "invalid config: schedule.cycles: a number is needed, not the boolean true"),
    ("serve.token=''", "invalid config: serve.token: is empty"),
    ("resume=/no/such/checkpoint", "invalid config: resume: /no/such/checkpoint is not a folder"),
    ("grpo.lr=[1", "override 'grpo.lr=[1' is not valid YAML"),
])
def test_a_bad_override_is_one_line(copd_ray, tmp_path, override, message):
    assert message in one_line(copd_ray("train", f"output_dir={tmp_path}/run", override, code=2))
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_is_one_line(copd_ray, tmp_path):
    (tmp_path / "c.yaml").write_text("grpo:\n  lr: [1e-4\nschedule: {cycles: 2}\n")
    line = one_line(copd_ray("train", str(tmp_path / "c.yaml"), code=2))
    assert f"config file {tmp_path}/c.yaml is not valid YAML" in line and "line 3" in line


def test_unwritable_output_dir_is_one_line(copd_ray, tmp_path):
    (tmp_path / "file").write_text("")
    line = one_line(copd_ray("train", f"output_dir={tmp_path}/file/run", code=2))
    assert f"output_dir {tmp_path}/file/run cannot be created: {tmp_path}/file is a file" in line


def test_a_reward_with_the_wrong_signature_is_one_line(copd_ray, tmp_path, monkeypatch):
    (tmp_path / "cli_rewards.py").write_text("def score(response):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = one_line(copd_ray("train", f"output_dir={tmp_path}/run", "capabilities.0.reward=cli_rewards:score", code=2))
    assert "capabilities.0.reward: reward 'cli_rewards:score' must take (response, answer)" in line


def test_a_dataset_of_another_format_is_one_line(copd_ray, tmp_path):
    (tmp_path / "d.csv").write_text("prompt,answer\n1+1=,2\n")
    line = one_line(copd_ray("train", f"output_dir={tmp_path}/run", f"capabilities.0.source={tmp_path}/d.csv", code=2))
    assert f"dataset {tmp_path}/d.csv: unsupported format" in line


def test_a_dataset_without_usable_rows_is_one_line_and_logged(copd_ray, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"problem": "1+1="}\n{"answer": "2"}\n')
    out = tmp_path / "run"
    line = one_line(copd_ray("train", f"output_dir={out}", f"cache_dir={tmp_path}/cache",
                             f"capabilities.0.source={tmp_path}/d.jsonl", code=1))
    assert "capability 'add': no usable rows" in line and f"(traceback in {out}/error.log)" in line
    assert "Traceback" in (out / "error.log").read_text() and "DataError" in (out / "error.log").read_text()


def test_chat_rows_without_a_chat_template_are_one_line(copd_ray, tmp_path):
    row = {"messages": [{"role": "user", "content": "1+1="}], "answer": "2"}
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(row) for _ in range(3)) + "\n")
    result = copd_ray("bootstrap", f"cache_dir={tmp_path}/cache", f"capabilities.0.source={tmp_path}/chat.jsonl",
                      "capabilities.0.heldout_size=1", "capabilities.0.validation_size=0", code=1)
    assert "capabilities 'add' (3) have chat rows" in one_line(result)
    assert not list((tmp_path / "cache").glob("*"))  # failed before any training


def test_a_non_utf8_row_is_skipped_and_counted(copd_ray, tmp_path, tiny_folder):
    rows = [json.dumps({"problem": f"{i}+1=", "answer": str(i + 1)}).encode() for i in range(6)]
    rows[2] = b'{"problem": "1\xff+1=", "answer": "2"}'
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    result = copd_ray("eval", "--model", str(tiny_folder), f"capabilities=[{{name: add, source: {tmp_path}/d.jsonl, "
                      "heldout_size: 2}]", code=0)
    assert f"data: {tmp_path}/d.jsonl: 5 rows kept, 1 skipped (1 not UTF-8)" in result.output


def test_an_empty_serve_token_is_one_line(copd_ray, tmp_path):
    line = one_line(copd_ray("serve", str(tmp_path), "--token", " ", code=2))
    assert "--token (or COPD_RAY_SERVE_TOKEN) is empty" in line


def test_the_real_command_line_and_debug(tmp_path):
    """As a user runs it: stderr holds the one line; --debug or COPD_RAY_DEBUG=1 the traceback."""
    cli = [sys.executable, "-m", "copd_ray.cli"]
    args = ["train", f"output_dir={tmp_path}/run", "grpo.lr=.inf", "schedule.cycles=true"]
    plain = subprocess.run(cli + args, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.splitlines() == ["error: invalid config:", "  schedule.cycles: a number is needed, not the "
                                         "boolean true", "  grpo.lr: Input should be a finite number"]
    debug = subprocess.run(cli + ["--debug"] + args, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    env = subprocess.run(cli + args, capture_output=True, text=True, timeout=120,
                         env={"PATH": "", "HOME": str(tmp_path), "COPD_RAY_DEBUG": "1"})
    assert env.returncode == 1 and "Traceback" in env.stderr


def test_help_shows_the_override_syntax():
    train = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "[CONFIG.yaml] [dotted.key=value ...]" in train.output
    compare = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    assert "seed, seed+1, ..., the first set by the seed=N override" in compare.output


def test_eval_of_a_run_folder_names_a_model_inside_it(copd_ray, tmp_path, tiny_folder):
    import shutil

    shutil.copytree(tiny_folder, tmp_path / "run" / "branches" / "add")
    line = one_line(copd_ray("eval", "-m", str(tmp_path / "run"), code=2))
    assert line == (f"error: --model {tmp_path / 'run'} is not a model folder (no config.json); it looks like a "
                    f"run's output folder: give one of its models, e.g. -m {tmp_path / 'run' / 'branches' / 'add'}")


def test_resources_no_local_ray_holds_are_refused_before_ray_starts(copd_ray, tmp_path, tiny_folder):
    """A placement group that can never be placed would wait ray.placement_timeout_s (60 s)
    and then fail; on a local run the sum of the branches' bundles is checked first."""
    line = one_line(copd_ray("train", f"output_dir={tmp_path}/run", f"model.path={tiny_folder}",
                             "resources.trainer_cpus=64", code=2))
    assert "the run's actors ask for 129 CPUs, and a local Ray here has" in line
    assert "1 trainers x 64 CPUs" in line and "set ray.num_cpus" in line


def test_a_node_per_branch_on_a_local_ray_is_refused_before_it_starts(copd_ray, tmp_path, tiny_folder):
    line = one_line(copd_ray("train", f"output_dir={tmp_path}/run", f"model.path={tiny_folder}",
                             "ray.branch_nodes=own", code=2))
    assert "ray.branch_nodes=own places each branch on a node of its own, and a local Ray is one node" in line


def test_the_resource_check_counts_the_scorers_of_the_runs_own_topology():
    """A topology given from Python (train(cfg, topology)) decides which branches get a scorer,
    so the check before Ray starts sums the bundles of that one, not of topology.*."""
    from copd_ray.bundles import run_needs
    from copd_ray.config import load_config
    from copd_ray.topology import Topology

    cfg = load_config(None, ["resources.trainer_cpus=1", "resources.generator_cpus=1", "resources.scorer_cpus=1",
                             "metrics.pair_every=0"])
    both_teach = run_needs(cfg, cfg.topology_graph().edges)  # pairwise: a scorer each
    assert both_teach["CPU"] == 6
    assert run_needs(cfg, Topology.from_config("edges", ["add", "mul"], edges=[("add", "mul")]).edges)["CPU"] == 5
