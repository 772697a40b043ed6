"""How far the pair metrics computed from top-k exchanges lie from the full-vocabulary
values, and how many bytes each exchange moves.

    python benchmarks/pair_metrics_topk.py [--student DIR --teacher DIR] [--sequences 64]

The scorers of a run share only their top `metrics.kl_topk` tokens per position
(`ScorerActor.pair_metrics`); the symmetric KL is then taken over the tokens both rank
in their top k plus one bin for the rest, a lower bound of the exact value. Here both
are computed along the student's own sampled rollouts (as a run probes them): exact from
full log-softmax rows, estimated from top-k for several k. Without folders, the student
and the teacher are the tiny policy after a few supervised steps on sums and on products
respectively (two branches of one base that disagree). Pure torch, no Ray.
"""

from __future__ import annotations

import argparse

import torch

from copd_ray.algo import symmetric_kl, topk_overlap, topk_pair_metrics
from copd_ray.engines import HFEngine, SamplingParams


def _fit(model, tokenizer, texts: list[str], steps: int = 40) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    model.train()
    for step in range(steps):
        rows = slice((step * 16) % len(texts), (step * 16) % len(texts) + 16)
        labels = ids["input_ids"][rows].masked_fill(ids["attention_mask"][rows] == 0, -100)
        model(input_ids=ids["input_ids"][rows], attention_mask=ids["attention_mask"][rows], labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _policies(args):
    from copd_ray.models import build_char_tokenizer, build_tiny_policy, load_policy

    if args.student:
        student, tokenizer = load_policy(args.student)
        teacher, _ = load_policy(args.teacher)
        return student.eval(), teacher.eval(), tokenizer
    tokenizer = build_char_tokenizer()
    # Two branches of one base that learnt different things: 40 supervised steps each, on
    # sums and on products (near-uniform untrained policies would make every k look bad).
    student, teacher = build_tiny_policy(tokenizer, seed=0), build_tiny_policy(tokenizer, seed=0)
    for model, op in ((student, "+"), (teacher, "*")):
        _fit(model, tokenizer, [f"{a}{op}{b}={eval(f'{a}{op}{b}')}" for a in range(10, 40) for b in range(2, 9)])
    return student.eval(), teacher.eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student")
    parser.add_argument("--teacher")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    student, teacher, tokenizer = _policies(args)
    torch.set_grad_enabled(False)
    s_engine = HFEngine(student, tokenizer.eos_token_id, tokenizer.pad_token_id)
    t_engine = HFEngine(teacher, tokenizer.eos_token_id, tokenizer.pad_token_id)
    prompts = [tokenizer(f"{10 + i}+{3 * i % 97}=")["input_ids"] for i in range(args.sequences)]
    samples = s_engine.generate(prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=args.new_tokens, seed=0))
    sequences = [prompts[s.prompt_index] + s.token_ids for s in samples]
    plens = [len(prompts[s.prompt_index]) for s in samples]

    s_rows, t_rows = s_engine.response_logprob_rows(sequences, plens), t_engine.response_logprob_rows(sequences, plens)
    width, vocab = max(len(r) for r in s_rows), s_rows[0].shape[-1]
    s_full, t_full = torch.zeros(len(s_rows), width, vocab), torch.zeros(len(s_rows), width, vocab)
    mask = torch.zeros(len(s_rows), width)
    for i, (s, t) in enumerate(zip(s_rows, t_rows)):
        s_full[i, : len(s)], t_full[i, : len(t)], mask[i, : len(s)] = s, t, 1.0
    exact_kl = symmetric_kl(s_full, t_full, mask).item()
    exact_overlap = topk_overlap(s_full, t_full, 10, mask).item()
    positions = int(mask.sum().item())
    print(f"{positions} response positions, vocabulary {vocab}; exact symmetric KL {exact_kl:.4f}, "
          f"top-10 overlap {exact_overlap:.4f}")
    print(f"{'k shared':>9} {'overlap@10':>11} {'sym KL':>9} {'of exact':>9} {'bytes/position':>15} {'vs full row':>12}")
    for k in sorted({10, 16, 32, 64, vocab} & set(range(10, vocab + 1))):
        s_top, t_top = s_full.topk(k, -1), t_full.topk(k, -1)
        overlap, kl = topk_pair_metrics(s_top.indices, s_top.values, t_top.indices, t_top.values, 10, mask)
        sent = k * (8 + 4)  # int64 id + float32 log-prob per entry, teacher -> student scorer
        print(f"{k:>9} {overlap.item():>11.4f} {kl.item():>9.4f} {kl.item() / exact_kl:>9.3f} {sent:>15} "
              f"{sent / (vocab * 4):>11.2f}x")


if __name__ == "__main__":
    main()
