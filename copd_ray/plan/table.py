"""The plan as a table on the console."""

from __future__ import annotations



from copd_ray.plan.rows import COLUMNS, TABLE_WIDTH, MemoryPlan, _gib, _group_name, _groups


HEADERS = ("weights", "grads", "optim", "activ", "logits", "KV", "other")


def table(plan: MemoryPlan, title: str = "estimated peak memory per actor, GiB"):
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    t.add_column("actor", no_wrap=True)
    t.add_column("GPUs", justify="right")
    for h in HEADERS:
        t.add_column(h, justify="right")
    t.add_column("need", justify="right")
    t.add_column("has", justify="right")
    t.add_column("fits", no_wrap=True)
    for group in _groups(plan.rows):
        r = group[0]
        verdict = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "?"}[r.fits]
        has = _gib(r.have)
        if r.gpus == 0:  # CPU actors share their node's memory: checked together, below the table
            has, verdict = "host", "-"
        t.add_row(f"{r.branch} {_group_name(group)}", f"{r.gpus:g}",
                  *(_gib(r.parts[c]) if r.parts[c] else "-" for c in COLUMNS), _gib(r.need), has, verdict)
    return t


def render(plan: MemoryPlan, console) -> None:
    """The table, what it rests on, and what does not fit with the settings that fix it."""
    from rich.markup import escape
    from rich.text import Text

    for note in plan.notes:
        console.print(note, markup=False, soft_wrap=True)
    if plan.memory_source:
        console.print(f"memory: {plan.memory_source}", markup=False, soft_wrap=True)
    wide = console
    if console.width < TABLE_WIDTH:  # whole rows, even in a pipe (80 columns) or a narrow terminal
        from rich.console import Console

        wide = Console(file=console.file, width=TABLE_WIDTH, force_terminal=console.is_terminal,
                       no_color=console.no_color, color_system=console.color_system)
    wide.print(table(plan))
    seen = set()
    for group in _groups(plan.rows):
        r = group[0]
        line = f"  {r.branch} {_group_name(group)}: {r.detail}"
        if r.detail and line not in seen:
            seen.add(line)
            console.print(line, markup=False, soft_wrap=True)
    for c in plan.checks:
        style = {True: "green", False: "red", None: "yellow"}[c.fits]
        console.print(Text(c.message, style=style), soft_wrap=True)
    unchecked = [r for r in plan.rows if r.fits is None and r.gpus > 0]
    if unchecked:
        console.print(Text(f"{len(unchecked)} GPU actors could not be checked: {plan.memory_source}", style="yellow"),
                      soft_wrap=True)
    problems = plan.problems()
    for p in problems:
        console.print(Text(f"does not fit: {p}", style="red"), soft_wrap=True)
    if not problems:
        console.print(escape("every actor fits." if not unchecked else "nothing found that does not fit."))
