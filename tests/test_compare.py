"""`copd-ray compare`: the plan (pure), the report (pure) and every row on a real local Ray."""

import json
import math

import pytest
from typer.testing import CliRunner

from conftest import TINY_COMPARE as TINY

from copd_ray.cli import app
from copd_ray.compare import plan, run_compare, run_config
from copd_ray.config import ConfigError, load_config
from copd_ray.report import markdown

def test_the_plan_states_every_run_and_budget_before_anything_runs(tmp_path):
    p = plan(load_config(), ["1:1", "2:1", "4:1"])  # 2:1 is the config's own 50:25, so it is not rerun
    t = 4 * 75
    assert p.steps_per_branch == t and p.half == t // 2
    assert [r.name for r in p.runs] == ["experts", "mixed", "static_opd_add_mul", "static_opd_mul_add", "mopd", "copd",
                                        "copd_without_mul_add", "copd_without_add_mul", "copd_ratio_38_37",
                                        "copd_ratio_60_15", "copd_merge_each_cycle", "copd_adaptive"]
    runs = {r.name: run_config(p, r, tmp_path / "seed_0" / r.name, 0, check_paths=False) for r in p.runs}
    assert runs["mixed"].schedule.rl_steps == 2 * t and runs["mixed"].branch_list()[0].data == ["add", "mul"]
    static = runs["static_opd_add_mul"]
    student, teacher = static.branch_list()
    assert (student.name, student.frozen, teacher.name, teacher.frozen) == ("mul", False, "add", True)
    assert teacher.init == str(tmp_path / "seed_0" / "experts" / "checkpoints" / f"step_{t // 2:06d}" / "branches" / "add")
    assert static.topology.edges == [("add", "mul")] and static.schedule.opd_steps == 2 * t - t
    assert runs["experts"].schedule.save_every == t // 2 and runs["experts"].topology.kind == "none"
    assert runs["copd_without_add_mul"].topology.edges == [("mul", "add")]
    adaptive = runs["copd_adaptive"].schedule
    assert (adaptive.kind, adaptive.kl_high, adaptive.cycles * (adaptive.rl_steps + adaptive.opd_steps)) == ("adaptive", 0.5, t)
    assert p.rows[-1].name == "CoPD adaptive (OPD while KL > 0.5)"
    assert runs["copd_merge_each_cycle"].merge.every_cycle
    assert {r.expected_steps for r in p.rows if r.group != "reference" and not r.name.startswith("expert ")} == {2 * t}
    # Seeds are independent replicates: seed 2 also draws the tiny policy's weights and its warm-up anew.
    two = run_config(p, p.runs[0], tmp_path / "seed_2" / "experts", 2, check_paths=False)
    zero = runs["experts"]
    assert (two.seed, two.model.tiny.seed, two.bootstrap.seed) == (2, 2, 2)
    assert (zero.seed, zero.model.tiny.seed, zero.bootstrap.seed) == (0, 0, 0)
    assert two.model.tiny.model_dump(exclude={"seed"}) == zero.model.tiny.model_dump(exclude={"seed"})
    with pytest.raises(ConfigError, match="RL:OPD"):
        plan(load_config(), ["1-2"])
    with pytest.raises(ConfigError, match="at least two branches"):
        plan(load_config(None, ["branches=[{name: add}]"]), [])


def test_a_table_2_plan_keeps_the_chosen_runs_copd_and_what_they_start_from():
    cfg = load_config("configs/demo_multimodal.yaml")
    p = plan(cfg, [], ["mixed", "mopd"])
    assert [r.name for r in p.runs] == ["experts", "mixed", "mopd", "copd"]  # mopd starts from the experts
    mopd = next(r for r in p.runs if r.name == "mopd")
    teachers = [b for b in mopd.changes["branches"] if b.get("frozen")]
    assert [b["name"] for b in teachers] == ["text", "image", "video"]  # three experts, one student
    assert [r.name for r in p.rows if r.group != "ablation"] == [
        "base", "expert text", "expert image", "expert video", "experts merged (no OPD)", "mixed RLVR",
        "MOPD (all experts → one student)", "CoPD (merged, mean)"]
    with pytest.raises(ConfigError, match=r"no run named \['moped'\]"):
        plan(cfg, [], ["moped"])


def test_merge_variants_weigh_branches_by_their_last_phase_i_reward_or_the_hub(tmp_path):
    from copd_ray.compare import merge_recipe

    p = plan(load_config(None, ["schedule.rl_steps=2"]), [])
    rewards = {"add": [0.1, 0.2, 0.9, 0.7], "mul": [0.3, 0.3, 0.2, 0.4]}  # steps 1-2 RL, 3 OPD, 4 RL
    phases = ["rl", "rl", "opd", "rl"]
    lines = [json.dumps({"kind": "step", "step": i + 1, "branch": n, "phase": phases[i], "reward_mean": r[i]})
             for i in range(4) for n, r in rewards.items()]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    method, weights = merge_recipe(p, tmp_path, "reward_weighted")
    # The last rl_steps = 2 Phase I records per branch: steps 2 and 4.
    assert method == "mean" and weights == pytest.approx([(0.2 + 0.7) / 2, (0.3 + 0.4) / 2])
    zero = [json.dumps({**json.loads(line), "reward_mean": 0.0}) for line in lines]
    (tmp_path / "metrics.jsonl").write_text("\n".join(zero) + "\n")
    assert merge_recipe(p, tmp_path, "reward_weighted") == ("mean", None)  # nothing earned: uniform
    assert merge_recipe(p, tmp_path, "task_arithmetic") == ("task_arithmetic", [1.0, 1.0])
    hub = plan(load_config("configs/demo_multimodal.yaml"), [])
    assert merge_recipe(hub, tmp_path, "hub_weighted") == ("mean", [2.0, 1.0, 1.0])  # text is the hub
    assert [r.name for r in hub.rows if r.model == "merged:hub_weighted"] == ["CoPD merged, hub text weighted 2x"]


def test_the_report_marks_best_and_worst_and_says_where_copd_loses():
    def row(name, group, add, overall_std=0.0):
        return {"name": name, "group": group, "mean": {"add": add, "overall": add}, "std": {"add": 0.1, "overall": overall_std},
                "budget": {"rl_steps": 4, "opd_steps": 0, "rollouts": 10, "teacher_tokens": 0}, "budget_ok": True,
                "expected_steps": 4, "vs_copd": {"mean": add - 0.5, "std": 0.01, "copd_ahead": int(add < 0.5), "seeds": 2,
                                                 "ci95": [add - 0.75, add - 0.25], "resolved": abs(add - 0.5) > 0.25}}
    result = {"capabilities": ["add"], "seeds": [0, 1], "branches": ["add", "mul"], "steps_per_branch": 2,
              "expert_steps_before_opd": 1,
              "rows": [row("base", "reference", 0.9), row("mixed", "baseline", 0.7), row("CoPD", "CoPD", 0.5),
                       row("no merge", "ablation", 0.2)]}
    md = markdown(result)
    assert "| mixed | **0.700 ± 0.100** |" in md and "| no merge | _0.200 ± 0.100_ |" in md
    assert "| -0.300 [-0.550, -0.050] (CoPD ahead 1/2), **resolved** |" in md  # the paired column of "no merge"
    assert "| +0.200 [-0.050, +0.450] (CoPD ahead 0/2) |" in md  # mixed: the interval holds 0, undecided
    assert "| base | 0.900 ± 0.100 |" in md  # the reference is never ranked
    assert "- add: CoPD (merged) 0.500; ahead of it: mixed (+0.200)." in md


def test_the_paired_interval_is_the_student_t_interval_over_seeds():
    from copd_ray.compare import paired_interval

    diffs = [0.01, 0.03, -0.02, 0.04, 0.02]  # row - CoPD, five seeds
    mean = 0.016
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = 2.7764451 * sd / math.sqrt(5)  # t(0.975, 4 degrees of freedom), from a table
    lo, hi = paired_interval(diffs)
    assert abs(lo - (mean - half)) < 1e-6 and abs(hi - (mean + half)) < 1e-6
    assert lo < 0 < hi  # undecided
    lo, hi = paired_interval([0.05, 0.04, 0.06])  # three seeds, all ahead by ~0.05
    half = 4.3026527 * 0.01 / math.sqrt(3)
    assert abs(lo - (0.05 - half)) < 1e-6 and lo > 0  # resolved
    assert json.loads(json.dumps([lo, hi, lo > 0])) == [lo, hi, True]  # plain floats and bools, for compare.json
    assert paired_interval([0.1]) is None


def test_compare_rejects_a_bad_ratio_before_any_actor_starts():
    result = CliRunner().invoke(app, ["compare", "--ratios", "3-1"])
    assert result.exit_code == 2 and "RL:OPD" in result.output


def test_compare_runs_every_row_with_budgets_and_resumes(warm_pool, tiny_folder, tmp_path):
    from rich.console import Console

    cfg = load_config(None, TINY + [f"model.path={tiny_folder}"])
    out = tmp_path / "compare"
    result = run_compare(cfg, out, seeds=1, ratios=["3:1"], console=Console(quiet=True), pool=warm_pool)

    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [
        "base", "expert add", "expert mul", "experts merged (no OPD)", "mixed RLVR", "static OPD add→mul",
        "static OPD mul→add", "MOPD (all experts → one student)", "CoPD (merged, mean)",
        "CoPD branch add alone (no merge)", "CoPD branch mul alone (no merge)", "CoPD merged by task_arithmetic",
        "CoPD merged, weighted by training reward", "CoPD without mul→add", "CoPD without add→mul", "CoPD ratio 3:1", "CoPD adaptive (OPD while KL > 0.5)"]
    assert all(r["budget_ok"] for r in rows.values())
    assert rows["expert add"]["budget"] == {"rl_steps": 4, "opd_steps": 0, "rollouts": 64, "teacher_tokens": 0}
    assert rows["mixed RLVR"]["budget"]["rl_steps"] == 8 and rows["mixed RLVR"]["budget"]["teacher_tokens"] == 0
    static = rows["static OPD add→mul"]["budget"]
    assert (static["rl_steps"], static["opd_steps"]) == (4, 4) and static["teacher_tokens"] > 0  # experts' 2+2, then 4
    assert rows["CoPD (merged, mean)"]["budget"]["opd_steps"] == 4
    assert rows["CoPD ratio 3:1"]["budget"]["opd_steps"] == 2
    adaptive = rows["CoPD adaptive (OPD while KL > 0.5)"]["budget"]
    assert adaptive["rl_steps"] + adaptive["opd_steps"] == 8  # the same K.T, however the phases fell
    phases = result["adaptive"][0]
    assert {n: len(seq) for n, seq in phases.items()} == {"add": 4, "mul": 4}
    assert sum(seq.count("opd") for seq in phases.values()) == adaptive["opd_steps"]
    for r in rows.values():
        assert set(r["mean"]) == {"add", "mul", "overall"} and all(0 <= v <= 1 for v in r["mean"].values())

    seed_dir = out / "seed_0"
    steps = [json.loads(line) for line in (seed_dir / "static_opd_add_mul" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert {r["branch"] for r in steps} == {"mul"} and {r["opd/add/teacher_version"] for r in steps} == {0}  # frozen
    teacher_dir = seed_dir / "experts" / "checkpoints" / "step_000002" / "branches" / "add"
    assert (teacher_dir / "model.safetensors").exists()
    assert (seed_dir / "copd" / "merged_task_arithmetic" / "model.safetensors").exists()
    assert set(result["pairs"]) == {"copd", "experts", "static_opd_add_mul", "static_opd_mul_add", "copd_adaptive"}
    # The independent experts log the same ordered pairs as CoPD at the same steps (Figure 4's baseline).
    copd_pairs = {(r["step"], r["teacher"], r["student"]) for r in result["pairs"]["copd"][0]}
    expert_pairs = {(r["step"], r["teacher"], r["student"]) for r in result["pairs"]["experts"][0]}
    assert expert_pairs == copd_pairs and {(t, s) for _, t, s in copd_pairs} == {("add", "mul"), ("mul", "add")}
    md = (out / "compare.md").read_text()
    assert all(name in md for name in rows)
    for f in ("compare.json", "compare_overlap_kl.png", "compare_ratio.png", "compare_overall.png",
              "compare_adaptive.png"):
        assert (out / f).stat().st_size > 0

    # A second call finds every run finished: nothing is trained again, the numbers are the same.
    stamps = {p: p.stat().st_mtime for p in seed_dir.glob("*/metrics.jsonl")}
    again = run_compare(cfg, out, seeds=1, ratios=["3:1"], console=Console(quiet=True), pool=warm_pool)
    assert {p: p.stat().st_mtime for p in seed_dir.glob("*/metrics.jsonl")} == stamps
    assert [r["mean"] for r in again["rows"]] == [r["mean"] for r in result["rows"]]
