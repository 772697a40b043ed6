"""Math answers checked for equivalence with math-verify, under a hard time limit."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from copd_ray.rewards.extract import final_answer

TIME_LIMIT_S = 5
MAX_ANSWER_CHARS = 1000  # longer "answers" are degenerate output, not math


def _as_latex(answer: str) -> str:
    # Wrapping in $...$ lets math-verify's LaTeX extractor see the whole string as one
    # expression; its plain-expression extractor still handles "14/3".
    return f"${answer}$"


def equivalent(predicted: str, gold: str, timeout: int | None = TIME_LIMIT_S) -> bool:
    """math-verify's equivalence; its timeout uses SIGALRM, so only on the main thread."""
    from math_verify import parse, verify  # here: sympy costs every process ~0.3 s, used or not

    gold_parsed = parse(_as_latex(gold), parsing_timeout=timeout)
    pred_parsed = parse(_as_latex(predicted), parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


class _Sandbox:
    """A child process for checks made off the main thread (Serve replicas, threaded
    actors), where SIGALRM cannot interrupt sympy. A check that overruns gets the child
    killed (a fresh one starts on the next call) and counts as wrong."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "copd_ray.rewards.math"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )

    def run(self, predicted: str, gold: str) -> bool:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            answer: list[str] = []
            reader = threading.Thread(target=lambda: answer.append(proc.stdout.readline()), daemon=True)
            try:
                proc.stdin.write(json.dumps([predicted, gold]) + "\n")
                proc.stdin.flush()
                reader.start()
                # The child's own limit is TIME_LIMIT_S per parse/verify; this one also
                # covers its start-up (importing sympy) on the first call.
                reader.join(timeout=4 * TIME_LIMIT_S + 30)
            except OSError:
                pass
            if not answer or not answer[0].strip():
                proc.kill()
                self._proc = None
                return False
            return answer[0].strip() == "1"


_sandbox = _Sandbox()


def math_reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer (last \\boxed{}, else a final-answer line) is
    mathematically equivalent to `answer`, else 0.0. Never raises, never hangs."""
    predicted = final_answer(response)
    if not predicted or len(predicted) > MAX_ANSWER_CHARS:
        return 0.0
    try:
        if threading.current_thread() is threading.main_thread():
            ok = equivalent(predicted, answer)
        else:
            ok = _sandbox.run(predicted, answer)
    except Exception:  # noqa: BLE001 - a reward must score hostile text, not crash on it
        return 0.0
    return 1.0 if ok else 0.0


if __name__ == "__main__":  # the sandbox child: one JSON [predicted, gold] per line in, "1"/"0" out
    for line in sys.stdin:
        try:
            predicted, gold = json.loads(line)
            result = equivalent(predicted, gold)
        except Exception:  # noqa: BLE001
            result = False
        print("1" if result else "0", flush=True)
