"""Grading: math-verify verdicts for model responses, in sandboxed worker processes.

What a row goes through
-----------------------
1. In the calling process, :func:`extract_boxed` takes the answer: the last ``\\boxed{...}``
   (balanced braces, ``\\{``/``\\}`` are literal) in the text after the last ``</think>``,
   or in the whole text when there is none. The scan is linear and bounded: it reads at most
   ``MAX_ANSWER_CHARS + 1`` characters after the ``\\boxed``, so a 1 MB response costs a
   couple of ``str.rfind`` calls, and the worker never sees more than that many characters.
2. Rows decided without parsing: no box, an empty one, or an unbalanced last one (a
   truncated response; no fall-back to an earlier box) -> ``no_answer``;
   an answer longer than ``MAX_ANSWER_CHARS`` -> ``parse_error`` (no real final answer is that
   long, and math-verify's regexes and parser get slow on such input). Identical
   (gold, answer) pairs are graded once (several rollouts of a problem often agree).
3. A worker process parses the gold (wrapped in ``$...$`` when it has no math delimiters;
   cached per worker) and the answer (as ``\\boxed{answer}``) with math-verify's
   ``LatexExtractionConfig`` only, then calls ``verify(gold, pred)`` (gold first). Plain
   numbers with thousands separators (``1 000``, ``1\\,000``, ``1{,}000``) are joined first:
   math-verify alone reads ``1 000`` as the product ``1*0``.

Statuses: ``ok`` (graded; ``correct`` says the verdict), ``no_answer``, ``parse_error``
(math-verify parsed nothing, an exception was raised inside, the gold is missing or
unparseable, or the row crashed its worker), ``timeout``. ``correct`` is True only for ``ok``.

Why worker processes
--------------------
math-verify's timeouts use ``signal.alarm``, which only works in a process's main thread,
and Prefect runs tasks in threads. So grading runs in ``spawn``-ed workers (never ``fork``:
the caller may be multithreaded), where math-verify's own (integer-second) timeouts work;
they cover almost every slow case (power towers, huge factorials, pathological regexes) and
let the worker live on. The parent keeps a hard per-row deadline as the backstop for code
that does not return to the interpreter: rows go to a worker in batches, the worker
reports each row as it finishes, the parent times the row in progress, and when it
exceeds ``timeout_s`` the worker is SIGKILLed, the row is marked ``timeout``, a fresh
worker is started and the rest of the batch is resubmitted. Workers also run under an
address-space limit (``memory_mb``), so a runaway allocation raises MemoryError
(-> ``parse_error``) instead of taking the machine down.

Nothing in a response is evaluated as code. ``ExprExtractionConfig`` (which hands text to
sympy's ``parse_expr``, i.e. ``eval``) is never used; on the LaTeX path latex2sympy builds
sympy objects from an ANTLR parse tree, and the only strings that reach ``parse_expr``
(through ``sympy.Number(str)``) are numeric tokens from its lexer. Each worker also replaces
``parse_expr`` in every loaded module with a guard that refuses anything but a plain number
or a bare identifier (sympy's lazily imported unit definitions sympify names like ``"kilo"``;
a lone name cannot call anything), so a future change in those libraries cannot silently
open an ``eval`` path.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import re
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from compaction.data.schema import GRADE_COLUMNS as SCHEMA_GRADE_COLUMNS, GRADE_STATUSES

if TYPE_CHECKING:  # pandas is imported lazily: workers and `compaction grade --help` do not need it
    import pandas as pd

STATUSES = GRADE_STATUSES
GRADE_COLUMNS = list(SCHEMA_GRADE_COLUMNS)

# Longest answer handed to math-verify; longer ones are `parse_error` without parsing.
MAX_ANSWER_CHARS = 1000
# A worker must import math-verify and answer "ready" within this many seconds.
STARTUP_TIMEOUT_S = 120.0
# Consecutive worker start failures before grading gives up (an environment problem).
MAX_START_FAILURES = 3
# Rows per batch sent to a worker: large enough that IPC is negligible (~1 ms/row of work),
# small enough that the work spreads over the workers and a kill resubmits little.
MAX_BATCH = 64


@dataclass
class Grade:
    correct: bool
    extracted_answer: str | None
    status: str
    grade_ms: float


# --------------------------------------------------------------------------- extraction

_BOXED = "\\boxed"
_THINK_END = "</think>"
# Brace tokens inside a box: escaped braces (\{ \}) and a LaTeX line break (\\) are consumed
# as units so that they never count as grouping braces.
_BRACE_TOKEN = re.compile(r"\\[\\{}]|[{}]")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` after ``</think>`` (or in the whole text), else None.

    Linear time and bounded: at most ``MAX_ANSWER_CHARS + 1`` characters are scanned after
    the last ``\\boxed``; an answer longer than that comes back as its first
    ``MAX_ANSWER_CHARS + 1`` characters (callers treat ``len > MAX_ANSWER_CHARS`` as too long).
    An unbalanced last box (e.g. a truncated response) gives None. Never raises.
    """
    if not isinstance(text, str):
        return None
    lo = text.rfind(_THINK_END)
    lo = 0 if lo < 0 else lo + len(_THINK_END)
    end = len(text)
    pos = text.rfind(_BOXED, lo)
    while pos >= 0:
        j = pos + len(_BOXED)
        if j < end and text[j].isalpha():  # another macro, e.g. \boxedfoo: look further left
            pos = text.rfind(_BOXED, lo, pos)
            continue
        k = j
        while k < end and k - j < 16 and text[k] in " \t\r\n":  # `\boxed {x}` is valid LaTeX
            k += 1
        if k < end and text[k] == "{":
            return _balanced_group(text, k + 1)
        return None  # `\boxed` without a braced argument
    return None


def _balanced_group(text: str, start: int) -> str | None:
    depth = 1
    window_end = min(len(text), start + MAX_ANSWER_CHARS + 1)
    for m in _BRACE_TOKEN.finditer(text, start, window_end):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[start:m.start()]
    if window_end < len(text):
        return text[start:window_end]  # too long: a bounded prefix, flagged by the caller
    return None  # unbalanced to the end of the text


def _clean_text(s: str) -> str:
    """Make ``s`` encodable as UTF-8 (lone surrogates -> '?'): Parquet and pickling stay safe."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _gold_text(gold: Any) -> str | None:
    try:
        if gold is None or gold != gold:  # None, NaN
            return None
    except TypeError:  # pd.NA: its comparisons are not booleans
        return None
    text = _clean_text(gold if isinstance(gold, str) else str(gold)).strip()
    return text or None


# --------------------------------------------------------------------------- worker side

# Thousands separators math-verify reads as a product ("1 000" -> 1*0): joined before parsing.
_THOUSANDS = re.compile(r"-?\d{1,3}(?:(?:,|\{,\}|\\,|\\ |\\;|~| )\d{3})+(?:\.\d+)?")
_THOUSANDS_SEP = re.compile(r"\{,\}|\\,|\\ |\\;|[,~ ]")
_HAS_DELIMITERS = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")
_NUMERIC_LITERAL = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*")


def normalize_answer(s: str) -> str:
    s = s.strip()
    if _THOUSANDS.fullmatch(s):
        return _THOUSANDS_SEP.sub("", s)
    return s


def wrap_gold(gold: str) -> str:
    """math-verify finds nothing in a bare gold like ``113``: wrap it as inline math."""
    gold = normalize_answer(gold)
    if _HAS_DELIMITERS.search(gold):
        return gold
    return "$" + gold.replace("\n", " ") + "$"  # inline math must be one line


def _install_parse_expr_guard() -> None:
    """Replace sympy's parse_expr (eval-based) everywhere it is bound by one that takes only a
    plain number or a bare identifier (neither can call anything). Model text never gets there
    (see the module docstring); this makes sure it stays so. A refusal is logged: it means a
    sympy path that sympifies strings and that the warm-up did not import beforehand."""
    import logging
    import sys

    from sympy.parsing import sympy_parser

    original = sympy_parser.parse_expr
    log = logging.getLogger(__name__)

    def guarded_parse_expr(s, *args, **kwargs):
        if isinstance(s, str) and (_NUMERIC_LITERAL.fullmatch(s) or s.isidentifier()):
            return original(s, *args, **kwargs)
        log.warning("grading: refused sympy parse_expr(%.80r)", s)
        raise ValueError("grading: refusing to parse a non-numeric string with sympy's parse_expr")

    for module in list(sys.modules.values()):
        try:
            if getattr(module, "parse_expr", None) is original:
                module.parse_expr = guarded_parse_expr
        except Exception:  # exotic modules with odd attribute access
            pass


# Comparisons that make sympy import what it imports lazily (units, combinatorics, set handlers),
# some of which sympify library strings at import time: done before the guard is installed.
_WARMUP = [
    ("1", "1"), ("x^2-1", "(x-1)(x+1)"), ("\\{1,2\\}", "\\{2,1\\}"), ("[1,2)", "[1,2)"), ("x=3", "3"),
    ("\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1&2\\end{pmatrix}"), ("x<3", "(-\\infty,3)"),
    ("\\sin x", "\\sin(x)"), ("1+i", "1+i"), ("50\\%", "0.5"), ("\\frac{\\sqrt{3}}{2}", "0.866025"),
    ("10^\\circ", "10"), ("\\log_2 8", "3"), ("(1,2,3)", "(1,2,3)"), ("5", "10 \\text{ cm}"),
]


class _Engine:
    """math-verify in a worker's main thread (so its signal-based timeouts work)."""

    GOLD_CACHE = 4096

    def __init__(self) -> None:
        import logging

        from math_verify import LatexExtractionConfig, parse, verify
        from math_verify.errors import TimeoutException

        logging.getLogger("math_verify").setLevel(logging.ERROR)
        self._parse, self._verify, self.TimeoutException = parse, verify, TimeoutException
        # Boxed first: the answer is handed over as \boxed{...}. LaTeX only, never ExprExtractionConfig.
        self._config = [LatexExtractionConfig(boxed_match_priority=0)]
        self._gold_cache: OrderedDict[str, list] = OrderedDict()
        for gold, answer in _WARMUP:
            self.grade(gold, answer, 5.0)
        self._gold_cache.clear()
        _install_parse_expr_guard()

    def _parse_latex(self, text: str, timeout_s: int) -> list:
        return self._parse(text, self._config, fallback_mode="no_fallback",
                           parsing_timeout=timeout_s, raise_on_error=True)

    def _gold(self, gold: str, timeout_s: int) -> list:
        parsed = self._gold_cache.get(gold)
        if parsed is None:
            parsed = self._parse_latex(wrap_gold(gold), timeout_s)  # a timeout raises: not cached
            self._gold_cache[gold] = parsed
            if len(self._gold_cache) > self.GOLD_CACHE:
                self._gold_cache.popitem(last=False)
        else:
            self._gold_cache.move_to_end(gold)
        return parsed

    def grade(self, gold: str, answer: str, budget_s: float) -> tuple[bool, str]:
        start = time.monotonic()

        def soft() -> int:  # math-verify takes whole seconds (signal.alarm); 0 would disable it
            return max(1, int(budget_s - (time.monotonic() - start)))

        try:
            gold_parsed = self._gold(gold, soft())
            if not gold_parsed:
                return False, "parse_error"
            pred = self._parse_latex("\\boxed{" + normalize_answer(answer) + "}", soft())
            if not pred:
                return False, "parse_error"
            return bool(self._verify(gold_parsed, pred, timeout_seconds=soft(), raise_on_error=True)), "ok"
        except self.TimeoutException:  # a BaseException subclass
            return False, "timeout"
        except Exception:
            return False, "parse_error"


def _worker_main(conn, memory_mb: int | None) -> None:
    """Worker loop: ``(budget_s, [(job, gold, answer), ...])`` in, one ``(job, correct, status, ms)`` out per row."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    if memory_mb:
        try:
            import resource

            limit = int(memory_mb) * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    engine = _Engine()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if msg is None:
            return
        budget_s, rows = msg
        for job, gold, answer in rows:
            t0 = time.perf_counter()
            correct, status = engine.grade(gold, answer, budget_s)
            try:
                conn.send((job, correct, status, (time.perf_counter() - t0) * 1e3))
            except OSError:  # parent gone
                return


# --------------------------------------------------------------------------- parent side

class _Worker:
    def __init__(self, ctx, memory_mb: int | None) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, memory_mb), daemon=True,
                                name="compaction-grading-worker")
        self.proc.start()
        child_conn.close()  # so that the parent sees EOF when the worker dies
        self.conn = parent_conn
        self.ready = False
        self.started = time.monotonic()
        self.batch: deque = deque()  # jobs sent and not yet answered, in order
        self.row_started = 0.0  # when the row at batch[0] started (as seen by the parent)
        self.dead = False

    def kill(self) -> None:
        self.dead = True
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass


def _shutdown(workers: list) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except Exception:
            pass
    for w in workers:
        try:
            w.proc.join(timeout=2)
        except Exception:
            pass
        w.kill()
    workers.clear()


class Grader:
    """A pool of ``workers`` grading processes with a hard per-row deadline of ``timeout_s``.

    Workers start on first use and are reused across :meth:`grade` calls; use as a context
    manager or call :meth:`close`. Safe to call from any thread (calls are serialised).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, memory_mb: int | None = 2048) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        self._ctx = mp.get_context("spawn")
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self._start_failures = 0
        self.restarts = 0  # workers replaced after a timeout or crash (for tests and logs)
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)

    # ---- lifecycle
    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            _shutdown(self._pool)

    def start(self) -> "Grader":
        """Start the workers now and wait until they are ready (otherwise the first grade does)."""
        with self._lock:
            self._fill_pool()
            while not all(w.ready for w in self._pool):
                self._step({}, deque(), None)
        return self

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool if not w.dead]

    # ---- grading
    def grade(self, responses: Sequence[str], golds: Sequence[str], progress: bool = False) -> list[Grade]:
        responses, golds = list(responses), list(golds)  # positional access, whatever the sequence type
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        n = len(responses)
        results: list[Grade | None] = [None] * n
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="grading", unit="row")
        # Decide what needs no worker; group the rest by (gold, answer).
        groups: dict[tuple[str, str], list[int]] = {}
        answers: list[str | None] = [None] * n
        for i in range(n):
            t0 = time.perf_counter()
            try:
                answer = extract_boxed(responses[i])
                if answer is not None:
                    answer = _clean_text(answer)
                answers[i] = answer
                gold = _gold_text(golds[i])
                if answer is None or not answer.strip():
                    results[i] = Grade(False, answer, "no_answer", 0.0)
                elif len(answer) > MAX_ANSWER_CHARS or gold is None:
                    results[i] = Grade(False, answer, "parse_error", 0.0)
                else:
                    groups.setdefault((gold, answer), []).append(i)
                    continue
            except Exception:  # defensive: extraction is written not to raise
                results[i] = Grade(False, answers[i], "parse_error", 0.0)
            results[i].grade_ms = (time.perf_counter() - t0) * 1e3
            if bar is not None:
                bar.update(1)
        jobs = list(groups)
        if jobs:
            with self._lock:
                verdicts = self._run(jobs, bar, [len(groups[k]) for k in jobs])
            for key, (correct, status, ms) in zip(jobs, verdicts):
                for i in groups[key]:
                    results[i] = Grade(bool(correct) and status == "ok", answers[i], status, ms)
        if bar is not None:
            bar.close()
        return results  # type: ignore[return-value]

    def _run(self, jobs: list[tuple[str, str]], bar, weights: list[int]) -> list[tuple[bool, str, float]]:
        out: dict[int, tuple[bool, str, float]] = {}
        pending: deque[int] = deque(range(len(jobs)))
        try:
            self._fill_pool()
            while len(out) < len(jobs):
                self._dispatch(jobs, pending)
                for job in self._step(out, pending, jobs):
                    if bar is not None:
                        bar.update(weights[job])
        except BaseException:
            # Interrupted (Ctrl-C, start failure): workers may hold rows of this call, whose
            # answers must not leak into the next one. Drop them; the next call starts fresh.
            _shutdown(self._pool)
            raise
        return [out[j] for j in range(len(jobs))]

    def _soft_budget(self) -> float:
        """Budget for math-verify's own timeouts: a second under the hard deadline, so that
        they fire first and the worker survives (they count whole seconds, at least 1)."""
        return max(1.0, self.timeout_s - 1.0)

    def _fill_pool(self) -> None:
        for w in [w for w in self._pool if w.dead]:
            self._pool.remove(w)
        while len(self._pool) < self.workers:
            self._pool.append(_Worker(self._ctx, self.memory_mb))

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.restarts += 1
        self._fill_pool()

    def _dispatch(self, jobs, pending: deque) -> None:
        """Top up each ready worker so it never waits for the parent: a new batch goes out
        while half of the previous one is still queued there (rows are graded in order, so
        the parent still knows which row is in progress)."""
        for w in list(self._pool):
            size = max(1, min(MAX_BATCH, math.ceil(len(pending) / (4 * self.workers))))
            if not (w.ready and pending and len(w.batch) <= size // 2):
                continue
            if not w.batch and not w.proc.is_alive():  # died while idle (killed from outside): nobody to blame
                self._replace(w)
                continue
            batch = [pending.popleft() for _ in range(min(size, len(pending)))]
            try:
                w.conn.send((self._soft_budget(), [(j, *jobs[j]) for j in batch]))
            except (OSError, ValueError):  # the worker is gone: _step sees it and handles its rows
                pending.extendleft(reversed(batch))
                continue
            if not w.batch:
                w.row_started = time.monotonic()
            w.batch.extend(batch)

    def _step(self, out: dict, pending: deque, jobs) -> list[int]:
        """Wait for worker messages or the nearest deadline; returns the jobs finished."""
        finished: list[int] = []
        now = time.monotonic()
        deadlines = [w.row_started + self.timeout_s if w.ready else w.started + STARTUP_TIMEOUT_S
                     for w in self._pool if w.batch or not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else 0.05
        waitables = [w.conn for w in self._pool] + [w.proc.sentinel for w in self._pool]
        mp_connection.wait(waitables, timeout=timeout)
        for w in list(self._pool):
            alive = self._drain(w, out, finished)
            if not alive:
                self._on_crash(w, out, pending, finished)
        now = time.monotonic()
        for w in list(self._pool):
            if w.ready and w.batch and now - w.row_started > self.timeout_s:
                # Hard deadline: the row is stuck where math-verify's own timeout cannot reach.
                job = w.batch.popleft()
                out[job] = (False, "timeout", (now - w.row_started) * 1e3)
                finished.append(job)
                pending.extendleft(reversed(w.batch))
                w.batch.clear()
                self._replace(w)
            elif not w.ready and now - w.started > STARTUP_TIMEOUT_S:
                self._start_failed(w, f"not ready after {STARTUP_TIMEOUT_S:.0f} s")
        return finished

    def _drain(self, w: _Worker, out: dict, finished: list[int]) -> bool:
        """Read every message a worker has sent; False when it is gone."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    self._start_failures = 0
                    continue
                job, correct, status, ms = msg
                if w.batch and w.batch[0] == job:
                    w.batch.popleft()
                    out[job] = (correct, status, ms)
                    finished.append(job)
                    w.row_started = time.monotonic()  # the next row starts now
        except (EOFError, OSError):
            return False
        return w.proc.is_alive()

    def _on_crash(self, w: _Worker, out: dict, pending: deque, finished: list[int]) -> None:
        if not w.ready:
            self._start_failed(w, f"exit code {w.proc.exitcode}")
            return
        if w.batch:
            # The row in progress took the worker down (e.g. a C-level abort): blame it, resubmit the rest.
            job = w.batch.popleft()
            out[job] = (False, "parse_error", (time.monotonic() - w.row_started) * 1e3)
            finished.append(job)
            pending.extendleft(reversed(w.batch))
            w.batch.clear()
        self._replace(w)

    def _start_failed(self, w: _Worker, why: str) -> None:
        self._start_failures += 1
        w.kill()
        if self._start_failures >= MAX_START_FAILURES:
            _shutdown(self._pool)
            raise RuntimeError(f"grading workers fail to start ({why}); see the worker's traceback on stderr")
        self._fill_pool()


def grade_responses(responses: Sequence[str], golds: Sequence[str], workers: int = 2, timeout_s: float = 5.0,
                    progress: bool = False) -> list[Grade]:
    """One-shot grading with a temporary :class:`Grader`."""
    with Grader(workers=workers, timeout_s=timeout_s) as grader:
        return grader.grade(responses, golds, progress=progress)


# --------------------------------------------------------------------------- frames and files

def _golds_for(rollouts: "pd.DataFrame", answers: "pd.DataFrame | None") -> list:
    if answers is None:
        if "answer" not in rollouts.columns:
            raise ValueError("rollouts have no 'answer' column: pass an answers frame with problem_id and answer")
        return list(rollouts["answer"])
    if "problem_id" not in rollouts.columns:
        raise ValueError("rollouts need a 'problem_id' column to join the answers on")
    missing_cols = [c for c in ("problem_id", "answer") if c not in answers.columns]
    if missing_cols:
        raise ValueError(f"answers frame: missing column(s) {missing_cols}")
    table = answers[["problem_id", "answer"]].drop_duplicates()
    dup = table["problem_id"][table["problem_id"].duplicated()]
    if len(dup):
        raise ValueError(f"answers frame: conflicting answers for problem_id(s) {list(dup.unique()[:5])}")
    lookup = dict(zip(table["problem_id"], table["answer"]))
    unknown = [p for p in rollouts["problem_id"].unique() if p not in lookup]
    if unknown:
        raise ValueError(f"{len(unknown)} problem_id(s) of the rollouts have no answer, e.g. {unknown[:5]}")
    return [lookup[p] for p in rollouts["problem_id"]]


def grade_rollouts(rollouts: "pd.DataFrame", answers: "pd.DataFrame | None" = None, workers: int = 2,
                   timeout_s: float = 5.0, progress: bool = False, grader: Grader | None = None) -> "pd.DataFrame":
    """Grades frame (schema: docs/design.md) for ``rollouts`` (rollout_id, response, answer or problem_id).

    Gold answers come from ``answers`` (problem_id, answer) joined on problem_id when given,
    else from the rollouts' own ``answer`` column. Pass ``grader`` to reuse running workers.
    """
    import pandas as pd

    missing = [c for c in ("rollout_id", "response") if c not in rollouts.columns]
    if missing:
        raise ValueError(f"rollouts: missing column(s) {missing}")
    golds = _golds_for(rollouts, answers)
    responses = list(rollouts["response"])
    if grader is None:
        grades = grade_responses(responses, golds, workers=workers, timeout_s=timeout_s, progress=progress)
    else:
        grades = grader.grade(responses, golds, progress=progress)
    problem_id = rollouts["problem_id"].to_numpy() if "problem_id" in rollouts.columns else [None] * len(rollouts)
    return pd.DataFrame({
        "rollout_id": rollouts["rollout_id"].to_numpy(),
        "problem_id": problem_id,
        "correct": pd.array([g.correct for g in grades], dtype=bool),
        "extracted_answer": pd.Series([g.extracted_answer for g in grades], dtype=object),
        "status": pd.Series([g.status for g in grades], dtype=object),
        "grade_ms": pd.array([g.grade_ms for g in grades], dtype="float64"),
    })


def _check_columns(path: Path, required: Sequence[str], hint: str = "") -> None:
    """Fail before any work, naming the file and the missing column(s); reads only the schema."""
    from compaction.artifacts import parquet_columns

    names = parquet_columns(path)
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}{hint}; has {names}")


def _grades_schema(df: "pd.DataFrame"):
    import pyarrow as pa

    schema = pa.Schema.from_pandas(df, preserve_index=False)
    fixed = {"correct": pa.bool_(), "extracted_answer": pa.string(), "status": pa.string(), "grade_ms": pa.float64()}
    fields = []
    for f in schema:
        t = fixed.get(f.name, pa.string() if pa.types.is_null(f.type) else f.type)  # all-null ids -> string
        fields.append(pa.field(f.name, t))
    return pa.schema(fields)


def grade_file(in_path, out_path, problems_path=None, workers: int = 2, timeout_s: float = 5.0,
               progress: bool = False) -> Path:
    """``compaction grade IN OUT [--problems FILE]``: grade a rollouts Parquet file, write grades atomically.

    Gold answers come from IN's ``answer`` column, or with ``problems_path`` from that file's
    ``answer`` joined on ``problem_id``. Columns are checked before any worker starts.
    """
    from compaction.artifacts import read_parquet, write_parquet

    in_path = Path(in_path)
    if problems_path is None:
        _check_columns(in_path, ["rollout_id", "response", "answer"],
                       " (the gold answers: add an 'answer' column or pass --problems)")
        answers = None
    else:
        problems_path = Path(problems_path)
        _check_columns(in_path, ["rollout_id", "problem_id", "response"])
        _check_columns(problems_path, ["problem_id", "answer"])
        answers = read_parquet(problems_path, required=["problem_id", "answer"])
    rollouts = read_parquet(in_path, required=["rollout_id", "response"])
    grades = grade_rollouts(rollouts, answers, workers=workers, timeout_s=timeout_s, progress=progress)
    return write_parquet(grades, out_path, schema=_grades_schema(grades))


_SHARED: dict[tuple[int, float], Grader] = {}
_SHARED_LOCK = threading.Lock()


def shared_grader(workers: int, timeout_s: float) -> Grader:
    """The process's :class:`Grader` for these settings: started on first use, closed at exit.

    A flow runs its round and evaluation tasks one after another in one process; starting new
    workers for each (spawn + importing math-verify) costs more than grading a round, so the
    tasks share these (docs/performance.md, "Fixed costs").
    """
    key = (int(workers), float(timeout_s))
    with _SHARED_LOCK:
        grader = _SHARED.get(key)
        if grader is None:
            grader = _SHARED[key] = Grader(*key)
            atexit.register(grader.close)
        return grader
