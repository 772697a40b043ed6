"""`copd-ray bootstrap`: build the tiny policy and warm it up with supervised steps until
every capability's held-out pass rate is moderate, then cache it on disk.

RL needs a base that sometimes succeeds: at 0% no GRPO group has a correct sample and
there is no gradient; near 100% there is nothing left to learn. Addition is learned far
faster than multiplication, so a capability that reaches `aim` is only replayed while
the others catch up, and the first evaluated checkpoint with every rate in its window is
kept (or, failing that, the one closest to it, among those where nothing lags if any). A
capability's window is [aim, high], raised at the bottom to `above_guess` over its guessing
rate: a visual task can sit at 35% by always answering "4", and RL from a policy that does
not look at its pictures goes nowhere.

A warm-up that cannot land stops early: once no capability lags, supervised steps only
raise rates, so a rate past `high` does not come back (the tiny VL policy's counting task
sits near 0.9 from step 450 on). It stops after `patience` evaluations without getting closer.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from copd_ray.capabilities import Capability, build_capability, check_chat_template
from copd_ray.config import Config, ConfigError
from copd_ray.data import PromptRecord, encode_prompt
from copd_ray.engines import HFEngine
from copd_ray.evaluation import evaluate, guessing_rate
from copd_ray.models.cache import cache_key, cache_path
from copd_ray.models.vl_inputs import VisionInputBuilder, collate

LANDED = (False, 0.0)  # the `_distance` of rates that all lie in their windows


def _sft_batch(records: list[PromptRecord], caps: dict[str, Capability], tokenizer, vision=None):
    """Right-padded inputs (with the pixels of a vision-language policy) and labels on the
    answer and eos only."""
    sequences, labels = [], []
    for r in records:
        prompt = encode_prompt(r, tokenizer, caps[r.capability].template, vision)
        answer = tokenizer(r.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    ids, mask, extra = collate(sequences, tokenizer.pad_token_id)
    targets = torch.full_like(ids, -100)
    for i, y in enumerate(labels):
        targets[i, : len(y)] = torch.tensor(y)
    return ids, mask, targets, extra


def _distance(rates: dict[str, float], floors: dict[str, float], high: float) -> tuple[bool, float]:
    """How far the rates are from all lying in [floor, high] (LANDED when they do),
    ranking any capability under its floor first: near guessing, GRPO gets no gradient,
    while a rate past `high` still leaves RL a little room."""
    lags = any(r < floors[n] for n, r in rates.items())
    return lags, sum(max(floors[n] - r, 0.0) + max(r - high, 0.0) for n, r in rates.items())


def settled(distance: tuple[bool, float], evals_since_best: int, patience: int) -> bool:
    """Whether a warm-up that has not landed should stop, given its latest `_distance`: no
    capability is under its floor (so training lifts rates, never lowers them back into the
    window) and the distance has not improved for `patience` evaluations."""
    lags, _ = distance
    return not lags and evals_since_best >= patience


def guess_floors(caps: dict[str, Capability], b) -> tuple[dict[str, float], dict[str, float]]:
    """Each capability's guessing rate and the rate the warm-up aims past: max(aim, guess +
    above_guess). Fails, naming the capability, when that leaves no room under `high`."""
    guess = {n: guessing_rate(c.heldout) for n, c in caps.items()}
    floors = {n: max(b.aim, g + b.above_guess) for n, g in guess.items()}
    for n, floor in floors.items():
        if floor > b.high:
            raise ConfigError(
                f"capability {n!r}: always giving its most common answer scores {guess[n]:.2f}, so no rate "
                f"in [{floor:.2f}, bootstrap.high={b.high}] can show it learned; lower bootstrap.above_guess "
                "or raise bootstrap.high")
    return guess, floors


def run_bootstrap(cfg: Config, progress: Callable[[int, dict], None] | None = None) -> dict:
    """Train from scratch and return {"rates", "guess", "steps" (of the checkpoint kept),
    "steps_run", "landed" (in the window), "seconds", "model", "tokenizer", "processor"}."""
    # Here, not at the top: a cached base (every run but the first) needs no model class.
    from copd_ray.models.tiny import build_char_tokenizer, build_tiny_policy
    from copd_ray.models.tiny_vl import build_image_processor, build_tiny_vl_policy, build_vl_tokenizer

    b = cfg.bootstrap
    torch.manual_seed(b.seed)
    rng = random.Random(f"copd-ray/bootstrap/{b.seed}")
    caps = {c.name: build_capability(c, cfg.seed) for c in cfg.capabilities}
    t = cfg.model.tiny
    vision = processor = None
    if t.vision:
        tokenizer, processor = build_vl_tokenizer(), build_image_processor()
        model = build_tiny_vl_policy(tokenizer, t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size, seed=t.seed)
        vision = VisionInputBuilder(tokenizer, processor, model.config)
    else:
        tokenizer = build_char_tokenizer()
        model = build_tiny_policy(tokenizer, t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size, seed=t.seed)
    check_chat_template(caps, tokenizer)
    engine = HFEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.engine.max_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=b.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(b.warmup_steps, 1)))

    def measure() -> dict[str, float]:
        return {
            name: evaluate(engine, tokenizer, cap.watched, cap.reward, cap.template, cfg.eval.max_new_tokens,
                           vision)["pass_rate"]
            for name, cap in caps.items()
        }

    guess, floors = guess_floors(caps, b)
    start = time.perf_counter()
    rates = {name: 0.0 for name in caps}
    best = ((True, float("inf")), None, rates, 0)  # (distance, state, rates, step)
    evals_since_best = 0
    for step in range(1, b.max_steps + 1):
        lagging = [n for n, r in rates.items() if r < floors[n]] or list(caps)
        weights = {n: (1.0 - b.replay_fraction) / len(lagging) if n in lagging else 0.0 for n in caps}
        warm = [n for n in caps if n not in lagging]
        for n in warm:
            weights[n] = b.replay_fraction / len(warm)
        if not warm:
            weights = {n: 1.0 / len(caps) for n in caps}
        names = rng.choices(list(caps), weights=[weights[n] for n in caps], k=b.batch_size)
        records = [caps[n].sample(1)[0] for n in names]

        model.train()
        ids, mask, labels, extra = _sft_batch(records, caps, tokenizer, vision)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()

        if step % b.eval_every == 0 or step == b.max_steps:
            model.eval()
            rates = measure()
            distance = _distance(rates, floors, b.high)
            evals_since_best += 1
            if distance < best[0]:
                best = (distance, {k: v.clone() for k, v in model.state_dict().items()}, rates, step)
                evals_since_best = 0
            if progress:
                progress(step, {"loss": loss.item(), **rates})
            if distance == LANDED or settled(distance, evals_since_best, b.patience):
                break

    steps_run = step
    distance, state, rates, step = best
    if state is not None:
        model.load_state_dict(state)
    model.eval()
    return {"rates": rates, "guess": guess, "steps": step, "steps_run": steps_run, "landed": distance == LANDED,
            "seconds": time.perf_counter() - start, "model": model, "tokenizer": tokenizer, "processor": processor}


def rate_warnings(rates: dict[str, float], guess: dict[str, float], b) -> list[str]:
    """One line per capability whose kept rate is off: outside its window [max(low, guess +
    above_guess), high], or in it but under its aim (raised the same way over guessing)."""
    lines = []
    for n, r in rates.items():
        clear = guess.get(n, 0.0) + b.above_guess  # older records have no guessing rates
        low, aim = max(b.low, clear), max(b.aim, clear)
        if r > b.high:
            lines.append(f"{n} {r:.3f} is over its window [{low:.3g}, {b.high}]")
        elif r < low:
            lines.append(f"{n} {r:.3f} is under its window [{low:.3g}, {b.high}]")
        elif r < aim:
            lines.append(f"{n} {r:.3f} is under its aim {aim:.3g}")
    return lines


def ensure_base_policy(cfg: Config, progress: Callable[[int, dict], None] | None = None, force: bool = False) -> tuple[Path, dict]:
    """The folder of the base policy and its bootstrap record, training it only if the
    cache for these settings is empty. A configured `model.path` is used as is, and a
    `model.gguf` file is imported once into a folder."""
    if cfg.model.path:
        return Path(cfg.model.path).expanduser(), {}
    if cfg.model.gguf:
        from copd_ray.models.gguf import import_gguf

        return import_gguf(cfg.model.gguf, cfg.cache_dir), {}
    folder = cache_path(cfg)
    record_file = folder / "bootstrap.json"
    if record_file.exists() and not force:
        return folder, {**json.loads(record_file.read_text()), "cached": True}
    result = run_bootstrap(cfg, progress)
    from copd_ray.models.tiny import save_policy
    from copd_ray.models.tiny_vl import save_vl_policy

    if result["processor"] is not None:
        save_vl_policy(result["model"], result["tokenizer"], result["processor"], folder)
    else:
        save_policy(result["model"], result["tokenizer"], folder)
    b, guess = cfg.bootstrap, result["guess"]
    record = {
        "rates": result["rates"], "guess": guess, "steps": result["steps"], "steps_run": result["steps_run"],
        "landed": result["landed"], "seconds": round(result["seconds"], 1),
        # In range: in [low, high] and clear of guessing.
        "in_range": all(max(b.low, guess[n] + b.above_guess) <= r <= b.high for n, r in result["rates"].items()),
        "key": cache_key(cfg),
        # What the rates (and the checkpoint's choice) were measured on.
        "measured_on": "validation" if all(c.validation_size for c in cfg.capabilities) else "held-out",
    }
    record_file.write_text(json.dumps(record, indent=2))
    return folder, {**record, "cached": False}
