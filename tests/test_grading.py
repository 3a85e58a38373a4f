"""Grading: equivalences, adversarial rows, deadlines, threads, and the file interface."""

from __future__ import annotations

import os
import signal
import threading
import time

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compaction import grading
from compaction.grading import MAX_ANSWER_CHARS, Grade, Grader, extract_boxed, grade_file, grade_responses, grade_rollouts

TIMEOUT_S = 2.0  # hard per-row deadline of the shared grader (math-verify's own timeouts: 1 s)


@pytest.fixture(scope="module")
def grader():
    g = Grader(workers=2, timeout_s=TIMEOUT_S)
    g.start()
    yield g
    g.close()


def timed_grade(grader: Grader, response, gold) -> tuple[Grade, float]:
    grader.start()  # a previous test may have replaced a worker: do not time its start-up
    t0 = time.monotonic()
    (g,) = grader.grade([response], [gold])
    return g, time.monotonic() - t0


# --------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("<think>\nmaybe \\boxed{7}\n</think>\nThe answer is \\boxed{113}.", "113"),
    ("<think>\n\\boxed{7}\n</think>\nno box after thinking", None),
    ("The answer is \\boxed{113}", "113"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are literal
    ("\\boxed {5}", "5"),
    ("\\boxed{\\boxed{3}}", "3"),
    ("\\boxed{1", None),  # unbalanced (truncated)
    ("\\boxed{}", ""),
    ("\\boxedfoo{1} \\boxed{2} \\boxedfoo{3}", "2"),
    ("\\boxed 5", None),
    ("", None),
    (None, None),
    (12345, None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_bounded_and_linear():
    huge = "x" * 5_000_000
    t0 = time.perf_counter()
    assert extract_boxed(huge) is None
    assert len(extract_boxed("\\boxed{" + huge + "}")) == MAX_ANSWER_CHARS + 1  # flagged as too long
    assert extract_boxed(("\\boxed{" * 200_000) + "1") is None  # last box unbalanced
    assert extract_boxed("{" * 1_000_000 + "\\boxed{2}" + "}" * 1_000_000) == "2"
    assert time.perf_counter() - t0 < 1.0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxed{}</think> 1x$\ud800\x00")) | st.characters(), max_size=200))
def test_extract_boxed_never_raises(text):
    out = extract_boxed(text)
    assert out is None or (isinstance(out, str) and len(out) <= MAX_ANSWER_CHARS + 1)


# --------------------------------------------------------------------------- equivalences

EQUIVALENCES = [
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("\\dfrac{3}{4}", "\\boxed{0.75}", True),
    ("\\frac{1}{2}", "\\boxed{0.51}", False),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", True),
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}", False),
    ("(1,2)", "\\boxed{(1, 2)}", True),
    ("(1,2)", "\\boxed{(2,1)}", False),
    ("(1,2,3)", "\\boxed{(1, 2, 3)}", True),
    ("(1,2,3)", "\\boxed{(1, 3, 2)}", False),
    ("[1,2)", "\\boxed{[1,2)}", True),
    ("[1,2)", "\\boxed{(1,2]}", False),
    ("2x+1", "\\boxed{1+2x}", True),
    ("2x+1", "\\boxed{2x-1}", False),
    ("x^2-1", "\\boxed{(x-1)(x+1)}", True),
    ("1000", "\\boxed{1,000}", True),
    ("1000", "\\boxed{1\\,000}", True),
    ("1000", "\\boxed{1 000}", True),
    ("0", "\\boxed{1 000}", False),  # math-verify alone reads "1 000" as 1*0
    ("1000000", "\\boxed{1{,}000{,}000}", True),
    ("1000", "\\boxed{100}", False),
    ("-3", "\\boxed{-3}", True),
    ("-3", "\\boxed{3}", False),
    ("3", "\\boxed{-3}", False),
    ("-\\frac{2}{3}", "\\boxed{\\frac{-2}{3}}", True),
    ("113", "<think>\nmaybe \\boxed{7}\n</think>\nThe answer is \\boxed{113}.", True),
    ("7", "<think>\nmaybe \\boxed{7}\n</think>\nThe answer is \\boxed{113}.", False),
    ("113", "\\boxed{114}", False),
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", True),
    ("\\pi", "\\boxed{3.14}", False),
    ("$\\frac{1}{2}$", "\\boxed{0.5}", True),  # gold with its own delimiters
    ("5", "\\boxed{x=5}", True),
    ("113", "\\boxed{\\boxed{113}}", True),
    (113, "\\boxed{113}", True),  # non-string gold (an int column)
    ("50\\%", "\\boxed{50\\%}", True),
]


def test_equivalences(grader):
    golds = [g for g, _, _ in EQUIVALENCES]
    responses = [r for _, r, _ in EQUIVALENCES]
    grades = grader.grade(responses, golds)
    wrong = [(gold, resp, exp, g) for (gold, resp, exp), g in zip(EQUIVALENCES, grades)
             if g.correct != exp or g.status != "ok"]
    assert not wrong


def test_statuses_and_dedup(grader):
    responses = ["no box here", "\\boxed{}", "\\boxed{" + "1" * 5000 + "}", "\\boxed{7}", "\\boxed{7}", "\\boxed{7}",
                 "\\boxed{\\frac{}{}}"]
    golds = ["7", "7", "7", "7", "7", None, "7"]
    g = grader.grade(responses, golds)
    assert [x.status for x in g] == ["no_answer", "no_answer", "parse_error", "ok", "ok", "parse_error", "parse_error"]
    assert [x.correct for x in g] == [False, False, False, True, True, False, False]
    assert g[0].extracted_answer is None and g[1].extracted_answer == ""
    assert len(g[2].extracted_answer) == MAX_ANSWER_CHARS + 1  # stored bounded
    assert all(isinstance(x.grade_ms, float) and x.grade_ms >= 0 for x in g)
    assert grader.grade([], []) == []
    with pytest.raises(ValueError):
        grader.grade(["a"], [])


# --------------------------------------------------------------------------- adversarial rows

MARK = "@MARK@"  # replaced by a per-test file path that must never be created
DEEP = 3000
ADVERSARIAL = {
    "import_system": "\\boxed{__import__('os').system('touch @MARK@')}",
    "eval": "\\boxed{eval(\"__import__('os').system('touch @MARK@')\")}",
    "exec": "\\boxed{exec(\"open('@MARK@', 'w')\")}",
    "open_write": "\\boxed{open('@MARK@', 'w').write('x')}",
    "lambda": "\\boxed{lambda: __import__('os').system('touch @MARK@')}",
    "lambda_bomb": "\\boxed{(lambda f: f(f))(lambda f: f(f))}",
    "subclasses": "\\boxed{().__class__.__base__.__subclasses__()[0]('touch @MARK@')}",
    "statements": "\\boxed{import os; os.system(\"touch @MARK@\")}",
    "sympify": "\\boxed{sympify(\"__import__('os').system('touch @MARK@')\")}",
    "backticks": "\\boxed{`touch @MARK@`}",
    "shell_subst": "\\boxed{$(touch @MARK@)}",
    "dollar_brace": "\\boxed{${__import__('os').system('touch @MARK@')}}",
    "latex_input": "\\boxed{\\input{/etc/passwd}}",
    "latex_write18": "\\boxed{\\immediate\\write18{touch @MARK@}}",
    "latex_def_loop": "\\boxed{\\def\\x{\\x}\\x}",
    "operatorname_eval": "\\boxed{\\operatorname{eval}(\\text{__import__('os').system('touch @MARK@')})}",
    "tower_10": "\\boxed{10^{10^{10^{10}}}}",
    "tower_9": "\\boxed{9^{9^{9^{9}}}}",
    "tower_2": "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
    "factorial_huge": "\\boxed{(10^{100})!}",
    "sqrt_power": "\\boxed{\\sqrt{2}^{10^{10}}}",
    "poly_power": "\\boxed{(x+1)^{1000000}}",
    "deep_braces": "\\boxed{" + "{" * DEEP + "1" + "}" * DEEP + "}",
    "deep_parens": "\\boxed{" + "(" * DEEP + "1" + ")" * DEEP + "}",
    "deep_fracs": "\\boxed{" + "\\frac{1}{" * DEEP + "1" + "}" * DEEP + "}",
    "deep_parens_in_bound": "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
    "deep_sqrt_in_bound": "\\boxed{" + "\\sqrt{" * 140 + "2" + "}" * 140 + "}",
    "regex_bomb_brackets": "\\boxed{" + " [ " * 330 + "}",
    "regex_bomb_parens": "\\boxed{" + "\\( " * 330 + "}",
    "mb_no_box": "x" * 2**20,
    "mb_in_box": "\\boxed{" + "9" * 2**20 + "}",
    "mb_open_boxes": "\\boxed{" * (2**20 // 7),
    "mb_braces": "{" * 2**20 + "\\boxed{" + "}" * 2**20,
    "lone_surrogate": "\\boxed{\ud800}",
    "lone_surrogates_around": "\udfff\\boxed{1\ud800}\ud800",
    "nul_in_box": "\\boxed{4\x002}",
    "nul_everywhere": "\x00" * 1000 + "\\boxed{\x00}" + "\x00",
    "empty": "",
    "empty_box": "\\boxed{}",
    "blank_box": "\\boxed{ \n\t }",
    "unbalanced_open": "\\boxed{{42}",
    "unbalanced_close": "\\boxed{1}}}}",
    "stray_closers_first": "}}}{{{\\boxed",
    "think_only": "<think>\\boxed{42}</think>",
    "not_a_string": None,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_row(grader, tmp_path, name):
    marker = tmp_path / "pwned"
    response = ADVERSARIAL[name]
    if isinstance(response, str):
        response = response.replace(MARK, str(marker))
    grade, wall = timed_grade(grader, response, "42")
    assert wall <= TIMEOUT_S + 1.0, f"{name}: {wall:.2f} s"
    assert grade.grade_ms <= (TIMEOUT_S + 1.0) * 1e3
    assert grade.correct is False
    assert grade.status in grading.STATUSES
    assert grade.extracted_answer is None or len(grade.extracted_answer) <= MAX_ANSWER_CHARS + 1
    if grade.extracted_answer is not None:
        grade.extracted_answer.encode("utf-8")  # storable (lone surrogates replaced)
    assert not marker.exists(), "model text was executed"
    # The grader still works afterwards.
    (after,) = grader.grade(["\\boxed{42}"], ["42"])
    assert after.correct and after.status == "ok"


def test_adversarial_batch_in_one_call(grader, tmp_path):
    marker = tmp_path / "pwned"
    responses = [r.replace(MARK, str(marker)) if isinstance(r, str) else r for r in ADVERSARIAL.values()]
    responses += ["\\boxed{42}"] * 3
    t0 = time.monotonic()
    grades = grader.grade(responses, ["42"] * len(responses))
    assert time.monotonic() - t0 < 30
    assert [g.correct for g in grades] == [False] * len(ADVERSARIAL) + [True] * 3
    assert not marker.exists()


def test_hard_deadline_kills_and_replaces_stuck_workers(grader):
    """Workers that stop responding (here: SIGSTOP) are killed at the deadline and the rest regraded."""
    grader.start()
    restarts = grader.restarts
    old = grader.worker_pids()
    for pid in old:
        os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    grades = grader.grade([f"\\boxed{{{i}}}" for i in range(8)], [str(i) for i in range(8)])
    wall = time.monotonic() - t0
    statuses = [g.status for g in grades]
    assert statuses.count("timeout") == 2  # the row in progress on each stuck worker
    assert all(g.correct for g in grades if g.status != "timeout")
    assert grader.restarts == restarts + 2
    assert not set(old) & set(grader.worker_pids())
    assert wall < TIMEOUT_S + 10  # deadline + a fresh worker's start-up
    for g in grades:
        if g.status == "timeout":
            assert TIMEOUT_S * 1e3 <= g.grade_ms <= (TIMEOUT_S + 1.0) * 1e3


def test_worker_killed_while_idle_is_replaced_without_blame(grader):
    grader.start()
    for pid in grader.worker_pids():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    grades = grader.grade(["\\boxed{1}", "\\boxed{2}"], ["1", "2"])
    assert [(g.correct, g.status) for g in grades] == [(True, "ok"), (True, "ok")]


def test_worker_crash_mid_batch_blames_one_row_per_crash(grader):
    grader.start()
    pids = grader.worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)

    def kill_later():
        time.sleep(0.5)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_later).start()
    grades = grader.grade([f"\\boxed{{{i}}}" for i in range(8)], [str(i) for i in range(8)])
    statuses = [g.status for g in grades]
    assert statuses.count("parse_error") == 2 and statuses.count("ok") == 6


# --------------------------------------------------------------------------- threads and pool

def test_works_from_a_non_main_thread(grader):
    out: dict = {}

    def run():
        try:
            out["shared"] = grader.grade(["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["0.5", "4"])
            out["own"] = grade_responses(["\\boxed{2x+1}"], ["1+2x"], workers=1, timeout_s=5.0)
        except BaseException as exc:  # surfaced below
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert "error" not in out, out.get("error")
    assert [g.correct for g in out["shared"]] == [True, False]
    assert out["own"][0].correct and out["own"][0].status == "ok"


def test_concurrent_calls_from_threads_share_one_grader(grader):
    results = [None] * 4

    def run(k):
        results[k] = grader.grade([f"\\boxed{{{k}}}"] * 20, [str(k)] * 10 + [str(k + 1)] * 10)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        assert [g.correct for g in r] == [True] * 10 + [False] * 10


def test_workers_start_lazily_and_close(monkeypatch):
    g = Grader(workers=1, timeout_s=5.0)
    assert g.worker_pids() == []
    with g:
        assert g.grade(["\\boxed{1}"], ["1"])[0].correct
        (pid,) = g.worker_pids()
        assert g.grade(["\\boxed{1}"], ["1"])[0].correct
        assert g.worker_pids() == [pid]  # reused
    assert g.worker_pids() == []


def test_shared_grader_keeps_its_workers_between_callers():
    from compaction.grading import shared_grader

    a = shared_grader(1, 4.0)
    assert a.grade(["\\boxed{2}"], ["2"])[0].correct
    (pid,) = a.worker_pids()
    b = shared_grader(1, 4.0)  # a later round task of the same flow process
    assert b is a and b.grade(["\\boxed{3}"], ["2"])[0].correct is False
    assert b.worker_pids() == [pid]
    assert shared_grader(1, 3.0) is not a  # other settings, other workers


# --------------------------------------------------------------------------- frames and files

def _rollouts(with_answer: bool) -> pd.DataFrame:
    df = pd.DataFrame({
        "rollout_id": ["r0", "r1", "r2", "r3"],
        "problem_id": ["p0", "p0", "p1", "p1"],
        "response": ["<think>\nhmm\n</think>\n\\boxed{113}", "\\boxed{112}", "\\boxed{\\frac{1}{2}}", "no answer"],
    })
    if with_answer:
        df["answer"] = ["113", "113", "0.5", "0.5"]
    return df


PROBLEMS = pd.DataFrame({"problem_id": ["p0", "p1"], "answer": ["113", "0.5"], "problem": ["a", "b"]})


def _check_grades(grades: pd.DataFrame) -> None:
    assert list(grades.columns) == grading.GRADE_COLUMNS
    assert list(grades["rollout_id"]) == ["r0", "r1", "r2", "r3"]
    assert list(grades["problem_id"]) == ["p0", "p0", "p1", "p1"]
    assert list(grades["correct"]) == [True, False, True, False]
    assert list(grades["status"]) == ["ok", "ok", "ok", "no_answer"]
    assert list(grades["extracted_answer"])[:3] == ["113", "112", "\\frac{1}{2}"]
    assert pd.isna(grades["extracted_answer"].iloc[3])
    assert grades["correct"].dtype == bool and grades["grade_ms"].dtype == "float64"


def test_grade_rollouts_with_answer_column_and_with_answers_frame(grader):
    _check_grades(grade_rollouts(_rollouts(True), grader=grader))
    _check_grades(grade_rollouts(_rollouts(False), PROBLEMS, grader=grader))
    with pytest.raises(ValueError, match="no answer"):
        grade_rollouts(_rollouts(False), PROBLEMS.iloc[:1], grader=grader)


def test_grade_file_happy_path(tmp_path):
    src = tmp_path / "rollouts.parquet"
    _rollouts(True).to_parquet(src)
    out = grade_file(src, tmp_path / "out" / "grades.parquet", workers=1)
    assert out == tmp_path / "out" / "grades.parquet"
    _check_grades(pd.read_parquet(out))
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp files left


def test_grade_file_joins_problems(tmp_path):
    src, problems = tmp_path / "rollouts.parquet", tmp_path / "problems.parquet"
    _rollouts(False).to_parquet(src)
    PROBLEMS.to_parquet(problems)
    out = grade_file(src, tmp_path / "grades.parquet", problems_path=problems, workers=1)
    _check_grades(pd.read_parquet(out))


def test_grade_file_all_null_answers_keep_string_type(tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "rollouts.parquet"
    pd.DataFrame({"rollout_id": [1, 2], "response": ["none", "none"], "answer": ["1", "2"]}).to_parquet(src)
    out = grade_file(src, tmp_path / "grades.parquet", workers=1)
    schema = pq.read_schema(out)
    assert str(schema.field("extracted_answer").type) == "string"
    assert str(schema.field("problem_id").type) == "string"


@pytest.mark.parametrize("case", ["no_answer_column", "no_response", "problems_without_answer", "missing_file"])
def test_grade_file_missing_columns_fail_before_workers_start(tmp_path, monkeypatch, case):
    def no_workers(*a, **k):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(grading, "_Worker", no_workers)
    src, problems = tmp_path / "rollouts.parquet", tmp_path / "problems.parquet"
    df = _rollouts(with_answer=False)
    if case == "no_response":
        df = df.drop(columns="response")
    df.to_parquet(src)
    PROBLEMS.drop(columns="answer").to_parquet(problems)
    if case == "missing_file":
        with pytest.raises(FileNotFoundError, match="nope.parquet"):
            grade_file(tmp_path / "nope.parquet", tmp_path / "g.parquet")
        return
    with pytest.raises(ValueError) as err:
        if case == "problems_without_answer":
            grade_file(src, tmp_path / "g.parquet", problems_path=problems)
        else:
            grade_file(src, tmp_path / "g.parquet", problems_path=problems if case == "no_response" else None)
    msg = str(err.value)
    missing_in = {"no_answer_column": (src, "answer"), "no_response": (src, "response"),
                  "problems_without_answer": (problems, "answer")}[case]
    assert str(missing_in[0]) in msg and f"'{missing_in[1]}'" in msg
    assert not (tmp_path / "g.parquet").exists()


def test_progress_bar_and_interrupted_call_leaves_grader_usable(grader, capsys, monkeypatch):
    grades = grader.grade(["\\boxed{1}"] * 5 + ["none"], ["1"] * 6, progress=True)
    assert [g.correct for g in grades] == [True] * 5 + [False]
    assert "grading" in capsys.readouterr().err

    calls = {"n": 0}
    real_step = Grader._step

    def interrupted_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(Grader, "_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        grader.grade([f"\\boxed{{{i}}}" for i in range(200)], [str(i) for i in range(200)])
    monkeypatch.setattr(Grader, "_step", real_step)
    grades = grader.grade([f"\\boxed{{{i}}}" for i in range(50)], [str(i + i % 2) for i in range(50)])
    assert [g.correct for g in grades] == [i % 2 == 0 for i in range(50)]


def test_worker_guard_refuses_sympy_eval_of_strings(tmp_path):
    """In a worker, sympy's eval-based string parsing takes numbers and bare names only."""
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    code = f"""
import sympy
from compaction.grading import _Engine
engine = _Engine()
assert engine.grade("x^2-1", "(x-1)(x+1)", 4.0) == (True, "ok")   # lazy sympy imports done before the guard
assert sympy.sympify("12") == 12 and str(sympy.sympify("kilo")) == "kilo"
for attack in ["__import__('os').system('touch {marker}')", "open('{marker}', 'w')", "1+1"]:
    try:
        sympy.sympify(attack)
    except Exception:
        continue
    raise SystemExit("not refused: " + attack)
print("guarded")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "guarded" in r.stdout, r.stdout + r.stderr
    assert not marker.exists()


def test_math_verify_soft_timeout_is_a_timeout_that_keeps_the_worker():
    """A power tower makes math-verify's own (signal) timeout fire inside the worker: the row is
    `timeout`, below the hard deadline, and the worker lives on (no kill, no restart)."""
    with Grader(workers=1, timeout_s=4.0) as g:
        g.start()
        pids, restarts = g.worker_pids(), g.restarts
        (grade,) = g.grade([ADVERSARIAL["tower_10"]], ["42"])
        assert grade.status == "timeout" and grade.correct is False
        assert grade.grade_ms < 4.0e3  # math-verify's budget (whole seconds under the deadline), not the kill
        assert g.restarts == restarts and g.worker_pids() == pids
        (after,) = g.grade(["\\boxed{42}"], ["42"])
        assert after.status == "ok" and after.correct
