"""`ray job submit` against a local head started with `ray start --head`, as the README shows."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO, free_port


@pytest.mark.slow
def test_ray_job_submit_runs_a_short_demo(tmp_path, tiny_folder):
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Token authentication on, as Ray ships it: the head, the job CLI and (through the head's
    # environment) the job's driver take the token from RAY_AUTH_TOKEN.
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    # Every fixed default port moved to a free one: the test session's own Ray may already
    # hold them (its dashboard agent on 52365 would leave this head without a job agent).
    own_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "ray-client-server-port", "runtime-env-agent-port")]
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # its own session dir; short for Unix sockets
    # --block keeps the head in this child process: ending it stops exactly this cluster,
    # not the test session's own Ray (which `ray stop` would also kill).
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}", *own_ports],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    out = tmp_path / "job-run"
    try:
        address, deadline = f"http://127.0.0.1:{dashboard}", time.time() + 120
        while True:
            assert head.poll() is None, head.stdout.read()
            try:
                if requests.get(f"{address}/api/version", timeout=5,
                                headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "the head's dashboard did not come up in 120 s"
            time.sleep(1)
        command = [
            ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
            "copd-ray", "train", "configs/demo.yaml", f"output_dir={out}", f"model.path={tiny_folder}",
            "schedule.cycles=1", "schedule.rl_steps=2", "schedule.opd_steps=1", "grpo.prompts_per_step=8",
            "opd.prompts_per_teacher=8", "eval.every=0", "metrics.pair_every=1", "wandb.mode=disabled",
            "capabilities.0.heldout_size=50", "capabilities.1.heldout_size=50", "resume=never"]
        for _ in range(12):
            submit = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
            # The dashboard answers before the node's job agent has registered with it.
            if "No available agent to submit job" not in submit.stdout + submit.stderr:
                break
            time.sleep(5)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        # Without the token the job API answers nothing but a refusal.
        assert requests.get(f"{address}/api/jobs/", timeout=5).status_code in (401, 403)
        refused = subprocess.run([ray_bin, "job", "list", "--address", address], capture_output=True, text=True,
                                 timeout=120, env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
        assert refused.returncode != 0
        assert "succeeded" in submit.stdout + submit.stderr
        result = json.loads((out / "eval.json").read_text())
        assert result["steps"] == 3 and set(result["eval"]) == {"base", "branch:add", "branch:mul", "merged"}
        assert (out / "merged" / "model.safetensors").exists() and (out / "pair_metrics.png").exists()

        # A job stopped once it has a checkpoint (its driver killed): the same command submitted
        # again resumes from that checkpoint, each step logged once.
        again = tmp_path / "job-resumed"
        resumable = [a.replace(str(out), str(again)) for a in command[command.index("--") + 1:] if a != "resume=never"]
        resumable += ["schedule.opd_steps=20", "schedule.save_every=2", "metrics.pair_every=0"]
        submit_again = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO)]
        first = subprocess.run(submit_again + ["--no-wait", "--submission-id", "copd-resume-1", "--", *resumable],
                               capture_output=True, text=True, timeout=120, env=env)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        deadline = time.time() + 300
        while not list(again.glob("checkpoints/step_000002/driver_state.json")):
            assert time.time() < deadline, "the first job wrote no checkpoint in 300 s"
            time.sleep(0.5)
        stopped = subprocess.run([ray_bin, "job", "stop", "--address", address, "copd-resume-1"],
                                 capture_output=True, text=True, timeout=120, env=env)
        assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
        status = subprocess.run([ray_bin, "job", "status", "--address", address, "copd-resume-1"],
                                capture_output=True, text=True, timeout=120, env=env)
        assert "was stopped" in status.stdout + status.stderr, status.stdout[-2000:]  # stopped, not finished
        second = subprocess.run(submit_again + ["--", *resumable], capture_output=True, text=True, timeout=600, env=env)
        assert second.returncode == 0 and "succeeded" in second.stdout + second.stderr, second.stdout[-3000:]
        rows = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
        resumed = [r for r in rows if r["kind"] == "event" and r["event"] == "resumed"]
        assert resumed and 2 <= resumed[-1]["step"] < 22  # from a checkpoint before the end
        steps = sorted((r["step"], r["branch"]) for r in rows if r["kind"] == "step")
        assert steps == [(t, b) for t in range(1, 23) for b in ("add", "mul")]  # each step once, none lost
        assert json.loads((again / "eval.json").read_text())["resumed_at"] == resumed[-1]["step"]
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
