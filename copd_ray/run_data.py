"""A run's data on the driver: each branch's D_k, the prompts of every step, and the
checks that must pass before any actor starts (`prepare`)."""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass, field

from copd_ray.capabilities import Capability, build_capability, check_chat_template
from copd_ray.checkpoints import find_resume
from copd_ray.config import Config, ConfigError
from copd_ray.data import PromptRecord, encode_prompt
from copd_ray.engines import SamplingParams
from copd_ray.errors import CopdError
from copd_ray.step_data import PromptBatch, StepPrompts
from copd_ray.topology import Topology


class BranchDataError(CopdError, ValueError):
    pass


@dataclass
class BranchData:
    """D_k: the capabilities a branch learns from, drawn in turn (one for a CoPD branch)."""

    name: str
    capabilities: list[Capability]
    drawn: int = 0

    def sample(self, n: int) -> list[PromptRecord]:
        out = [self.capabilities[(self.drawn + i) % len(self.capabilities)].sample(1)[0] for i in range(n)]
        self.drawn += n
        return out

    def replay(self, drawn: int) -> None:
        """Fresh streams advanced by `drawn` prompts: where a checkpoint left them."""
        self.capabilities = [c.fork(f"/{self.name}") for c in self.capabilities]
        self.drawn = 0
        self.sample(drawn)


@dataclass
class Prompter:
    """Prompt records -> what the policy reads (token ids, or VisualInputs with the pixels of
    a vision-language policy), their answers and reward names."""

    caps: dict[str, Capability]
    tokenizer: object
    vision: object = None  # a VisionInputBuilder for a vision-language policy
    # Branch threads evaluate and probe at once; a fast tokenizer is not re-entrant.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, records: list[PromptRecord], params: SamplingParams) -> PromptBatch:
        with self.lock:
            ids = [encode_prompt(r, self.tokenizer, self.caps[r.capability].template, self.vision) for r in records]
        return PromptBatch(ids, [r.answer for r in records], [self.caps[r.capability].reward_name for r in records],
                           params)


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def sampling(cfg: Config, n: int, seed: int, temperature: float | None = None) -> SamplingParams:
    g = cfg.grpo
    return SamplingParams(n=n, temperature=g.temperature if temperature is None else temperature, top_p=g.top_p,
                          max_new_tokens=g.max_new_tokens, seed=seed)


def opd_temperature(cfg: Config) -> float:
    return cfg.grpo.temperature if cfg.opd.temperature is None else cfg.opd.temperature


def draw_prompts(phases: dict[str, str], step: int, cfg: Config, data: dict[str, BranchData], prompter: Prompter,
                 teachers_of: dict[str, dict[str, object]]) -> dict[str, StepPrompts]:
    """Every prompt of this step for each branch in its phase ({branch: "rl" or "opd"}),
    drawn in the driver's thread (streams are not thread-safe and a fixed draw order makes
    resuming exact). `teachers_of`: {branch in Phase II: {teacher: its live scorer endpoint}},
    asked of the topology for this step (`Runtime.teachers_of`), so a re-registered scorer is
    used from the next step on."""
    plan = {}
    for name, phase in phases.items():
        native = None
        if phase == "rl" or cfg.opd.native_rl:
            native = prompter(data[name].sample(cfg.grpo.prompts_per_step),
                              sampling(cfg, cfg.grpo.group_size, seed_of(cfg.seed, name, step, "rl")))
        teachers = {}
        if phase == "opd":
            for teacher, scorer in teachers_of[name].items():
                params = sampling(cfg, cfg.opd.samples_per_prompt, seed_of(cfg.seed, name, step, "opd", teacher),
                                  opd_temperature(cfg))
                teachers[teacher] = (scorer, prompter(data[teacher].sample(cfg.opd.prompts_per_teacher), params))
        plan[name] = StepPrompts(step, phase, native, teachers)
    return plan


def check_one_vocabulary(base_tokenizer, branch_cfgs, trust_remote_code: bool = False) -> None:
    """A teacher scores a student's token ids, so every branch must read them as the same
    tokens: a branch started from another folder (`init`) must share the base's vocabulary."""
    from transformers import AutoTokenizer

    vocab = base_tokenizer.get_vocab()
    for b in branch_cfgs:
        if b.init is None:
            continue
        theirs = AutoTokenizer.from_pretrained(b.init, trust_remote_code=trust_remote_code).get_vocab()
        if theirs != vocab:
            differ = len(set(theirs.items()) ^ set(vocab.items()))
            raise BranchDataError(f"branch {b.name!r} starts from {b.init}, whose vocabulary is not the base's "
                                  f"({len(theirs):,} vs {len(vocab):,} tokens, {differ:,} entries differ): its "
                                  "scores would be of other tokens; use a model of the same tokenizer")


def prepare(cfg: Config, topology: Topology | None, console):
    """Everything that can fail before any actor starts: topology, data, base policy."""
    from transformers import AutoTokenizer

    from copd_ray.bootstrap import ensure_base_policy
    from copd_ray.models.vl_inputs import VisionInputBuilder

    branch_cfgs = cfg.branch_list()
    names = [b.name for b in branch_cfgs]
    topology = topology or cfg.topology_graph()
    if sorted(topology.branches) != sorted(names):
        raise ConfigError(f"the topology's branches {list(topology.branches)} are not the config's {names}")
    caps = {}
    for c in cfg.capabilities:
        try:
            caps[c.name] = build_capability(c, cfg.seed)
        except ValueError as e:
            users = [b.name for b in branch_cfgs if c.name in cfg.branch_data(b)]
            raise BranchDataError(f"branch(es) {users} cannot train: {e}") from None
        for report in caps[c.name].reports:
            console.print(f"data: {report}")
    # D_k for every branch, each with streams of its own.
    data = {b.name: BranchData(b.name, [caps[d].fork(f"/{b.name}") for d in cfg.branch_data(b)]) for b in branch_cfgs}
    base_path, _ = ensure_base_policy(cfg)
    # The newest usable checkpoint of this very run (same base, branches and topology);
    # a damaged one is reported and skipped.
    trained = [b.name for b in cfg.trainable_branches()]
    resume, resume_state = find_resume(cfg.resume, cfg.output_dir, str(base_path), trained, topology.edges,
                                       warn=lambda m: console.print(m, style="yellow", markup=False))
    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=cfg.model.trust_remote_code)
    check_chat_template(caps, tokenizer)
    check_one_vocabulary(tokenizer, branch_cfgs, cfg.model.trust_remote_code)
    vision = VisionInputBuilder.for_folder(str(base_path), cfg.model.trust_remote_code)
    visual = [n for n, c in caps.items() if any(r.images or r.videos for r in c.heldout)]
    if visual and vision is None:
        raise BranchDataError(f"capabilities {visual} have images or videos but the policy at {base_path} "
                              "reads text only: use a vision-language model")
    if visual and cfg.topology.transport == "serve":
        raise BranchDataError(f"capabilities {visual} have images or videos, and the HTTP scoring API takes token "
                              "ids only: use topology.transport=actor")
    return topology, caps, data, (resume, resume_state), str(base_path), Prompter(caps, tokenizer, vision)
