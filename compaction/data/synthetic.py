"""The embedded math domain: seeded, verifiable problems with thinking-style traces.

Each problem is built from a short chain of *steps* ("45 * 2 = 90"), each a small exact
operation. From the steps we write

- the **reference solution**: the steps, once each, then the boxed answer. It is the
  teacher's privileged context in OPSD.
- **SFT traces** in a thinking style: the same steps inside ``<think> ... </think>``, with
  redundant moves inserted at a controllable rate: re-verifications of a step, restated
  intermediate results, "wait" / "hmm" hesitations, and detours (a wrong value, noticed and
  corrected) that come back to the right path. This redundancy is what OPSD should remove:
  the teacher, who sees the concise solution, finds these tokens unlikely.

Everything is a pure function of the seed, so the same params give the same data.
Answers are integers or reduced fractions written in LaTeX that math-verify parses.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from math import gcd
from typing import Callable

import pandas as pd

from compaction.data.schema import PROBLEM_COLUMNS, problem_id

SOURCE = "synthetic"


@dataclass
class Step:
    """One exact operation of a solution, e.g. text="45 * 2 = 90", result="90"."""

    text: str
    result: str
    #: a plausible wrong result for a detour ("45 * 2 = 80? No, ..."); None = no detour here
    wrong: str | None = None


@dataclass
class SyntheticProblem:
    family: str
    difficulty: int
    problem: str
    answer: str  # LaTeX, no delimiters
    steps: list[Step] = field(default_factory=list)
    intro: str = ""  # first line of the thinking ("We need the remainder of 47 divided by 6.")


def latex_number(value: Fraction | int) -> str:
    v = Fraction(value)
    if v.denominator == 1:
        return str(v.numerator)
    sign = "-" if v < 0 else ""
    return f"{sign}\\frac{{{abs(v.numerator)}}}{{{v.denominator}}}"


def plain_number(value: Fraction | int) -> str:
    v = Fraction(value)
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def _near_miss(rng: random.Random, value: int) -> str:
    """A wrong value close to the right one (an off-by-a-little slip)."""
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    return str(value + delta)


def _max_operand(difficulty: int) -> int:
    return {1: 9, 2: 20, 3: 50, 4: 99}.get(difficulty, 10 ** min(difficulty - 2, 4) - 1)


def max_number(difficulty: int) -> int:
    """Largest number any step of a problem at this difficulty may show (operands and results).

    This bounds the number of distinct arithmetic facts per level: a tiny model trained for a
    few minutes learns a fact only after ~100 exposures (docs/tuning.md), so difficulty 1 must
    be a small, closed set of facts that the eval split shares with the training split.
    """
    return {1: 20, 2: 50, 3: 100}.get(difficulty, 10 ** min(difficulty - 1, 5))


# ------------------------------------------------------------------------ families
def arithmetic(rng: random.Random, difficulty: int) -> SyntheticProblem:
    """a op b op c ...: multiplications first, then left to right."""
    hi = _max_operand(difficulty)
    n_ops = min(1 + difficulty // 2 + rng.randint(0, 1), 4)
    nums = [rng.randint(1, hi)]
    ops: list[str] = []
    for _ in range(n_ops):
        op = rng.choice(["+", "-", "*"])
        nums.append(rng.randint(2, 9) if op == "*" else rng.randint(1, hi))
        ops.append(op)
    expr = " ".join([str(nums[0])] + [f"{o} {n}" for o, n in zip(ops, nums[1:])])
    steps: list[Step] = []
    # Fold multiplications into their left operand first.
    terms, term_ops = [nums[0]], []
    for op, n in zip(ops, nums[1:]):
        if op == "*":
            value = terms[-1] * n
            steps.append(Step(f"{terms[-1]} * {n} = {value}", str(value), _near_miss(rng, value)))
            terms[-1] = value
        else:
            terms.append(n)
            term_ops.append(op)
    acc = terms[0]
    for op, n in zip(term_ops, terms[1:]):
        value = acc + n if op == "+" else acc - n
        steps.append(Step(f"{acc} {op} {n} = {value}", str(value), _near_miss(rng, value)))
        acc = value
    return SyntheticProblem("arithmetic", difficulty, f"Compute {expr}.", str(acc), steps,
                            f"We need to compute {expr}.")


def linear_equation(rng: random.Random, difficulty: int) -> SyntheticProblem:
    hi = _max_operand(difficulty)
    x = rng.randint(-hi // 2 if difficulty > 2 else 1, hi)
    a = rng.randint(2, 9 if difficulty < 3 else 12)
    b = rng.randint(1, hi)
    sign = rng.choice(["+", "-"])
    c = a * x + b if sign == "+" else a * x - b
    rhs_step = f"{c} - {b}" if sign == "+" else f"{c} + {b}"
    ax = a * x
    steps = [
        Step(f"{a}x = {rhs_step} = {ax}", f"{a}x = {ax}", f"{a}x = {_near_miss(rng, ax)}"),
        Step(f"x = {ax} / {a} = {x}", f"x = {x}", None),
    ]
    return SyntheticProblem("linear_equation", difficulty, f"Solve for x: {a}x {sign} {b} = {c}.", str(x), steps,
                            f"We need x with {a}x {sign} {b} = {c}.")


def modular(rng: random.Random, difficulty: int) -> SyntheticProblem:
    m = rng.randint(3, 9 if difficulty < 3 else 13)
    n = rng.randint(m + 1, _max_operand(difficulty + 1))
    q, r = divmod(n, m)
    steps = [
        Step(f"{m} * {q} = {m * q}", str(m * q), str(m * (q + 1))),
        Step(f"{n} - {m * q} = {r}", str(r), None),
    ]
    return SyntheticProblem("modular", difficulty, f"What is the remainder when {n} is divided by {m}?", str(r),
                            steps, f"We need {n} mod {m}.")


def fraction_sum(rng: random.Random, difficulty: int) -> SyntheticProblem:
    hi = 4 + 2 * difficulty
    b, d = rng.randint(2, hi), rng.randint(2, hi)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    den = b * d // gcd(b, d)
    a2, c2 = a * den // b, c * den // d
    total = Fraction(a, b) + Fraction(c, d)
    steps = [
        Step(f"the common denominator of {b} and {d} is {den}", str(den), str(b * d) if b * d != den else None),
        Step(f"{a}/{b} = {a2}/{den} and {c}/{d} = {c2}/{den}", f"{a2}/{den} + {c2}/{den}", None),
        Step(f"{a2}/{den} + {c2}/{den} = {a2 + c2}/{den}", f"{a2 + c2}/{den}", f"{a2 + c2 + 1}/{den}"),
    ]
    if gcd(a2 + c2, den) != 1:
        steps.append(Step(f"{a2 + c2}/{den} reduces to {plain_number(total)}", plain_number(total), None))
    return SyntheticProblem("fraction_sum", difficulty, f"Compute {a}/{b} + {c}/{d} as a reduced fraction.",
                            latex_number(total), steps, f"We need {a}/{b} + {c}/{d}.")


def gcd_lcm(rng: random.Random, difficulty: int) -> SyntheticProblem:
    g = rng.randint(2, 3 + 2 * difficulty)
    p, q = rng.sample(range(1, 4 + 2 * difficulty), 2)
    x, y = max(p, q) * g, min(p, q) * g
    steps: list[Step] = []
    a, b = x, y
    while b:
        qq, rr = divmod(a, b)
        steps.append(Step(f"{a} = {qq} * {b} + {rr}", str(rr), str(rr + 1) if rr else None))
        a, b = b, rr
    d = a
    if rng.random() < 0.5:
        steps.append(Step(f"so gcd({x}, {y}) = {d}", str(d), None))
        return SyntheticProblem("gcd_lcm", difficulty, f"Find the greatest common divisor of {x} and {y}.", str(d),
                                steps, f"We need gcd({x}, {y}). Use the Euclidean algorithm.")
    lcm = x * y // d
    steps.append(Step(f"gcd({x}, {y}) = {d}", str(d), None))
    steps.append(Step(f"lcm = {x} * {y} / {d} = {lcm}", str(lcm), _near_miss(rng, lcm)))
    return SyntheticProblem("gcd_lcm", difficulty, f"Find the least common multiple of {x} and {y}.", str(lcm),
                            steps, f"We need lcm({x}, {y}) = {x} * {y} / gcd({x}, {y}).")


def sequence_sum(rng: random.Random, difficulty: int) -> SyntheticProblem:
    """Sum of a short list, added term by term (running sums)."""
    hi = _max_operand(difficulty)
    nums = [rng.randint(1, hi) for _ in range(2 + difficulty)]
    steps: list[Step] = []
    acc = nums[0]
    for n in nums[1:]:
        steps.append(Step(f"{acc} + {n} = {acc + n}", str(acc + n), _near_miss(rng, acc + n)))
        acc += n
    listed = ", ".join(map(str, nums))
    return SyntheticProblem("sequence_sum", difficulty, f"Find the sum of {listed}.", str(acc), steps,
                            f"We need {' + '.join(map(str, nums))}.")


def word_problem(rng: random.Random, difficulty: int) -> SyntheticProblem:
    names = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana"]
    items = ["apples", "pens", "coins", "books", "stamps", "marbles"]
    who, what = rng.choice(names), rng.choice(items)
    start = rng.randint(1, _max_operand(difficulty))
    bags, per = rng.randint(2, 9), rng.randint(2, 3 + 2 * difficulty)
    give = rng.randint(0, start) if difficulty > 1 else 0
    got = bags * per
    steps = [Step(f"{bags} * {per} = {got}", str(got), _near_miss(rng, got)),
             Step(f"{start} + {got} = {start + got}", str(start + got), _near_miss(rng, start + got))]
    text = f"{who} has {start} {what} and buys {bags} bags of {per} {what} each."
    total = start + got
    if give:
        steps.append(Step(f"{total} - {give} = {total - give}", str(total - give), _near_miss(rng, total - give)))
        text += f" Then {who} gives away {give} {what}."
        total -= give
    text += f" How many {what} does {who} have now?"
    return SyntheticProblem("word_problem", difficulty, text, str(total), steps,
                            f"{who} starts with {start} {what}.")


FAMILIES: dict[str, Callable[[random.Random, int], SyntheticProblem]] = {
    "arithmetic": arithmetic,
    "linear_equation": linear_equation,
    "modular": modular,
    "fraction_sum": fraction_sum,
    "gcd_lcm": gcd_lcm,
    "sequence_sum": sequence_sum,
    "word_problem": word_problem,
}


# ---------------------------------------------------------------- solutions/traces
def boxed_line(answer: str) -> str:
    return f"The answer is $\\boxed{{{answer}}}$."


def reference_solution(p: SyntheticProblem) -> str:
    """The concise solution: each step once, then the answer (the teacher's privileged context)."""
    # Steps are kept verbatim (no capitalisation: "x = 6", "gcd(12, 6)" must stay as they are).
    body = " ".join(f"{s.text}." for s in p.steps)
    return f"{body} {boxed_line(p.answer)}"


HESITATIONS = ["Wait,", "Hmm,", "Hmm, wait.", "Wait, hmm."]
RECHECKS = ["Let me double-check: {t}. Yes.", "Let me verify that: {t}. Correct.", "Wait, let me re-check: {t}. Yes.",
            "Hmm, is that right? {t}. Yes, it is."]
RESTATES = ["So far we have {r}.", "So we have {r}.", "Let me restate: {r}."]
DETOURS = ["Maybe {w}? No, wait. {t}.", "Hmm, I first thought {w}, but actually {t}.", "Perhaps {w}? Let me check again: {t}."]
FINAL_CHECKS = ["Let me double-check the whole thing once more. {t}. Yes.", "Wait, let me verify the final step: {t}. Correct."]


def thinking_trace(p: SyntheticProblem, rng: random.Random, redundancy_rate: float) -> str:
    """A thinking-style solution with redundant moves inserted at ``redundancy_rate`` per step."""
    lines = [p.intro]
    for s in p.steps:
        text = f"{s.text}."
        if rng.random() < redundancy_rate:
            move = rng.choice(["hesitate", "recheck", "restate", "detour"])
            if move == "hesitate":
                lines.append(f"{rng.choice(HESITATIONS)} {text}")
            elif move == "detour" and s.wrong is not None:
                wrong = s.text.rsplit("=", 1)[0] + "= " + s.wrong if "=" in s.text else s.wrong
                lines.append(rng.choice(DETOURS).format(w=wrong.strip(), t=s.text))
            elif move == "restate":
                lines.append(text)
                lines.append(rng.choice(RESTATES).format(r=s.result))
            else:
                lines.append(text)
                lines.append(rng.choice(RECHECKS).format(t=s.text))
        else:
            lines.append(text)
    if rng.random() < redundancy_rate:
        lines.append(rng.choice(FINAL_CHECKS).format(t=p.steps[-1].text))
    thinking = "\n".join(lines)
    return f"<think>\n{thinking}\n</think>\n\n{boxed_line(p.answer)}"


# -------------------------------------------------------------------- generation
_NUMBER = re.compile(r"\d+")


def _draw(rng: random.Random, families: list[str], difficulty: tuple[int, int]) -> SyntheticProblem:
    family = rng.choice(families)
    level = rng.randint(difficulty[0], difficulty[1])
    bound = max_number(level)
    for _ in range(100):  # redraw until every number in the steps is within the level's bound
        p = FAMILIES[family](rng, level)
        if all(int(n) <= bound for s in p.steps for n in _NUMBER.findall(s.text)):
            return p
    return p  # a family that cannot meet the bound at this level keeps its last draw


def _row(p: SyntheticProblem, split: str) -> dict:
    return {
        "problem_id": problem_id(SOURCE, p.problem),
        "source": SOURCE,
        "split": split,
        "problem": p.problem,
        "answer": p.answer,
        "solution": reference_solution(p),
        "difficulty": p.difficulty,
        "family": p.family,
        # The step chain, so traces can be regenerated from the Parquet file alone.
        "steps": json.dumps([[s.text, s.result, s.wrong] for s in p.steps]),
        "intro": p.intro,
    }


def generate_problems(
    n_train: int, n_eval: int, seed: int = 0, families: list[str] | None = None,
    difficulty: tuple[int, int] = (1, 3),
) -> pd.DataFrame:
    """Deterministic train / eval problems; the splits never share a problem text.

    Eval is drawn from its own random stream, so changing ``n_train`` never changes the
    eval split (comparisons across runs stay on the same problems).
    """
    families = list(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"data.synthetic.families: unknown family {unknown}; known: {sorted(FAMILIES)}")
    lo, hi = difficulty
    if not 1 <= lo <= hi:
        raise ValueError(f"data.synthetic.difficulty: need 1 <= low <= high, got {difficulty}")
    rows: list[dict] = []
    seen: set[str] = set()
    for split, n, stream in (("eval", n_eval, "eval"), ("train", n_train, "train")):
        rng = random.Random(f"{seed}:{stream}")
        count, attempts = 0, 0
        while count < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(
                    f"data.synthetic: only {count} distinct {split} problems found for n={n}; "
                    "widen families or difficulty"
                )
            p = _draw(rng, families, (lo, hi))
            if p.problem in seen:
                continue
            seen.add(p.problem)
            rows.append(_row(p, split))
            count += 1
    return pd.DataFrame(rows, columns=list(PROBLEM_COLUMNS) + ["family", "steps", "intro"])


def problem_from_row(row) -> SyntheticProblem:
    steps = [Step(t, r, w) for t, r, w in json.loads(row["steps"])]
    return SyntheticProblem(row["family"], int(row["difficulty"]), row["problem"], row["answer"], steps, row["intro"])


def slipped(p: SyntheticProblem) -> SyntheticProblem | None:
    """``p`` with its last step computed wrong (its near-miss value) and that value boxed as the
    answer: an uncaught slip. None when the last step has no near-miss or does not give the answer."""
    last = p.steps[-1] if p.steps else None
    if last is None or last.wrong is None or last.result != p.answer or "=" not in last.text:
        return None
    text = last.text.rsplit("=", 1)[0] + "= " + last.wrong
    return SyntheticProblem(p.family, p.difficulty, p.problem, last.wrong, [*p.steps[:-1], Step(text, last.wrong)],
                            p.intro)


def premature(p: SyntheticProblem) -> SyntheticProblem | None:
    """``p`` stopped one step early: the working up to the next-to-last step, whose value is boxed
    as the answer (``3x = 12`` boxes 12: the division forgotten). None when ``p`` has one step, or
    when that value happens to be the answer."""
    if len(p.steps) < 2:
        return None
    value = p.steps[-2].result.rsplit("=", 1)[-1].strip()
    if value == p.answer:
        return None
    return SyntheticProblem(p.family, p.difficulty, p.problem, value, p.steps[:-1], p.intro)


def direct_answer(p: SyntheticProblem) -> str:
    """The answer without the working: an empty thinking block, then the boxed answer (the
    no-thinking mode of hybrid reasoning models)."""
    return f"<think>\n</think>\n\n{boxed_line(p.answer)}"


def _drawn(key: str, rate: float) -> bool:
    """A seeded yes/no with probability ``rate``: each choice of a trace draws from its own stream
    (``key``), so one rate does not move the other traces."""
    return rate > 0 and random.Random(key).random() < rate


def make_traces(problems: pd.DataFrame, redundancy_rate: float, seed: int = 0, traces_per_problem: int = 1,
                privileged_fraction: float = 0.0, slip_rate: float = 0.0,
                direct_answer_rate: float = 0.0, premature_answer_rate: float = 0.0) -> pd.DataFrame:
    """SFT traces for synthetic problems: ``problem_id, trace_index, problem, context, response, answer,
    slipped`` (``slipped``: the trace boxes a wrong answer, an uncaught slip or a premature stop;
    ``answer`` is always the problem's right answer).

    ``context`` is None for ordinary examples. For a seeded ``privileged_fraction`` of the
    problems one more example shows the reference solution in the prompt (``context``) and
    answers with the concise trace: a reader who holds the solution follows it without
    re-checks or hesitations. This is what makes the OPSD teacher (the same model, prompted with
    the solution) find the student's redundant moves unlikely.
    """
    if "steps" not in problems.columns:
        raise ValueError("make_traces: problems have no 'steps' column (only synthetic problems have traces)")
    out = []
    for _, row in problems.iterrows():
        p = problem_from_row(row)
        base = {"problem_id": row["problem_id"], "problem": row["problem"], "answer": row["answer"]}
        for k in range(traces_per_problem):
            rng = random.Random(f"{seed}:{row['problem_id']}:{k}")
            direct = _drawn(f"{seed}:{row['problem_id']}:{k}:direct", direct_answer_rate)
            slip = slipped(p) if not direct and _drawn(f"{seed}:{row['problem_id']}:{k}:slip", slip_rate) else None
            if not direct and slip is None and _drawn(f"{seed}:{row['problem_id']}:{k}:premature", premature_answer_rate):
                slip = premature(p)
            response = direct_answer(p) if direct else thinking_trace(slip or p, rng, redundancy_rate)
            out.append({**base, "trace_index": k, "context": None, "slipped": slip is not None, "response": response})
        if _drawn(f"{seed}:{row['problem_id']}:privileged", privileged_fraction):
            rng = random.Random(f"{seed}:{row['problem_id']}:{traces_per_problem}")
            out.append({**base, "trace_index": traces_per_problem, "context": row["solution"], "slipped": False,
                        "response": thinking_trace(p, rng, 0.0)})
    columns = ["problem_id", "trace_index", "problem", "context", "response", "answer", "slipped"]
    return pd.DataFrame(out, columns=columns)
