"""Pulling the final answer out of a model's response text."""

from __future__ import annotations

import re

# A final-answer line, as models write it when they do not box: "The answer is 42",
# "Answer: 42", "#### 42" (GSM8K style), "Final answer: 42".
_ANSWER_LINE = re.compile(
    r"(?:final answer|the answer is|answer\s*:|####)\s*[:=]?\s*(.+?)\s*\.?\s*$",
    re.IGNORECASE | re.MULTILINE,
)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if there is none
    or it is never closed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0:
        # "\boxed 5" form
        rest = text[start + len("\\boxed"):].strip().split()
        return rest[0].rstrip("$.") if rest else None
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def final_answer(text: str) -> str | None:
    """The last boxed answer, else the last final-answer line, else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].strip().strip("$").strip()
    return None
