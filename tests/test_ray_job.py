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
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
