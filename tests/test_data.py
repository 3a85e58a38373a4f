import json

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compaction.data import build_problems, generate_problems, load_problem_set, make_traces
from compaction.data.loaders import split_train_eval
from compaction.data.schema import PROBLEM_COLUMNS
from compaction.data.synthetic import FAMILIES
from compaction.metrics import epistemic_rate
from compaction.params import DatasetSpec, DEFAULT_EPISTEMIC_MARKERS, load_params


def test_generator_is_deterministic_and_has_the_schema():
    a = generate_problems(200, 40, seed=3)
    b = generate_problems(200, 40, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns[: len(PROBLEM_COLUMNS)]) == list(PROBLEM_COLUMNS)
    assert a["problem_id"].is_unique
    assert not a.equals(generate_problems(200, 40, seed=4))


def test_splits_never_share_a_problem_and_eval_is_stable():
    df = generate_problems(500, 100, seed=0)
    train, ev = df[df.split == "train"], df[df.split == "eval"]
    assert len(train) == 500 and len(ev) == 100
    assert not set(train.problem) & set(ev.problem)
    # Eval has its own random stream: more training problems never change it.
    bigger = generate_problems(900, 100, seed=0)
    assert list(bigger[bigger.split == "eval"].problem_id) == list(ev.problem_id)


def test_every_family_and_difficulty_appears():
    df = generate_problems(700, 0, seed=1, difficulty=(1, 4))
    assert set(df.family) == set(FAMILIES)
    assert set(df.difficulty) == {1, 2, 3, 4}


def test_difficulty_knob_makes_numbers_bigger():
    easy = generate_problems(300, 0, seed=2, families=["arithmetic"], difficulty=(1, 1))
    hard = generate_problems(300, 0, seed=2, families=["arithmetic"], difficulty=(4, 4))
    size = lambda df: df.answer.astype(int).abs().mean()
    assert size(hard) > 3 * size(easy)


def test_bad_family_or_difficulty_is_named():
    with pytest.raises(ValueError, match="data.synthetic.families"):
        generate_problems(10, 1, families=["calculus"])
    with pytest.raises(ValueError, match="data.synthetic.difficulty"):
        generate_problems(10, 1, difficulty=(3, 1))


def test_redundancy_rate_controls_trace_length_and_markers():
    df = generate_problems(300, 0, seed=5)
    concise = make_traces(df, 0.0)
    redundant = make_traces(df, 0.8)
    n_tokens = lambda t: t.response.str.split().str.len().sum()
    rate = lambda t: epistemic_rate(t.response, n_tokens(t), DEFAULT_EPISTEMIC_MARKERS)
    assert rate(concise) == 0.0
    assert rate(redundant) > 20  # per 1k words
    assert n_tokens(redundant) > 1.3 * n_tokens(concise)
    # Every redundant move kind shows up somewhere.
    text = "\n".join(redundant.response)
    for phrase in ["Wait", "Hmm", "double-check", "So far we have", "No, wait"]:
        assert phrase in text


def test_privileged_examples_show_the_solution_and_follow_it_concisely():
    df = generate_problems(200, 0, seed=7)
    traces = make_traces(df, 0.8, seed=1, privileged_fraction=0.3)
    plain, privileged = traces[traces.context.isna()], traces[traces.context.notna()]
    assert len(plain) == len(df)  # every problem keeps its ordinary trace
    assert 0.2 * len(df) < len(privileged) < 0.4 * len(df)
    solutions = dict(zip(df.problem_id, df.solution))
    assert all(c == solutions[p] for p, c in zip(privileged.problem_id, privileged.context))
    # Concise: exactly the reference steps, no redundant move.
    concise = make_traces(df[df.problem_id.isin(set(privileged.problem_id))], 0.0).set_index("problem_id")
    assert all(r == concise.loc[p, "response"] for p, r in zip(privileged.problem_id, privileged.response))
    without = make_traces(df, 0.8, seed=1)  # fraction 0: the same ordinary traces, no extra rows
    assert list(without.response) == list(plain.response) and without.context.isna().all()


def test_trace_shape_is_thinking_then_boxed_answer():
    df = generate_problems(50, 0, seed=6)
    for trace, answer in zip(make_traces(df, 0.5).response, df.answer):
        assert trace.startswith("<think>\n") and "\n</think>\n\n" in trace
        assert trace.endswith(f"\\boxed{{{answer}}}$.")


def test_build_problems_from_params():
    p = load_params(None, ["data.synthetic.n_train=30", "data.synthetic.n_eval=5"])
    df = build_problems(p.data)
    assert (df.split == "train").sum() == 30 and (df.split == "eval").sum() == 5
    assert json.loads(df.steps.iloc[0])


# ---------------------------------------------------------------- property test
@pytest.fixture(scope="module")
def grader():
    from compaction.grading import Grader

    with Grader(workers=2, timeout_s=10.0) as g:
        yield g


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), low=st.integers(1, 4), span=st.integers(0, 2),
       rate=st.floats(0.0, 1.0))
def test_solutions_and_traces_grade_correct_against_their_own_answer(grader, seed, low, span, rate):
    df = generate_problems(12, 4, seed=seed, difficulty=(low, low + span))
    traces = make_traces(df, rate, seed=seed)
    responses = list(df.solution) + list(traces.response)
    golds = list(df.answer) + list(traces.answer)
    grades = grader.grade(responses, golds)
    bad = [(r, g, x) for r, g, x in zip(responses, golds, grades) if not x.correct]
    assert not bad, bad[:3]


def test_slipped_traces_box_a_wrong_answer_and_leave_the_others_unchanged(grader):
    df = generate_problems(60, 4, seed=3, families=["arithmetic", "word_problem", "modular"], difficulty=(1, 2))
    df = df[df.split == "train"]
    clean = make_traces(df, 0.5, seed=3)
    slips = make_traces(df, 0.5, seed=3, slip_rate=0.5)
    assert not clean.slipped.any()
    # Families whose last step has no near-miss value (modular) never slip.
    family = slips.problem_id.map(dict(zip(df.problem_id, df.family)))
    assert not slips[family == "modular"].slipped.any()
    assert 0.2 < slips.slipped.mean() < 0.6
    # Unslipped traces are the same text as with slip_rate 0 (slips draw from their own stream).
    assert (slips.response[~slips.slipped] == clean.response[~slips.slipped]).all()
    # A slipped trace is graded wrong against the problem's answer, which the row keeps.
    grades = grader.grade(list(slips.response[slips.slipped]), list(slips.answer[slips.slipped]))
    assert not any(g.correct for g in grades)


def test_premature_traces_stop_one_step_early_and_box_a_wrong_answer(grader):
    df = generate_problems(60, 4, seed=3, families=["arithmetic", "linear_equation", "modular"], difficulty=(1, 1))
    df = df[df.split == "train"]
    clean = make_traces(df, 0.5, seed=3)
    early = make_traces(df, 0.5, seed=3, premature_answer_rate=0.5)
    assert 0.2 < early.slipped.mean() < 0.6
    assert (early.response[~early.slipped] == clean.response[~early.slipped]).all()  # their own random stream
    # One step fewer than the full trace shows ("3x = 12" is boxed as 12: the division forgotten).
    steps = early.problem_id.map(dict(zip(df.problem_id, df.steps.map(json.loads))))
    for response, chain in zip(early.response[early.slipped], steps[early.slipped]):
        assert chain[-2][0] in response and chain[-1][0] not in response
        assert response.endswith(f"\\boxed{{{chain[-2][1].rsplit('=', 1)[-1].strip()}}}$.")
    grades = grader.grade(list(early.response[early.slipped]), list(early.answer[early.slipped]))
    assert not any(g.correct for g in grades)


def test_direct_answer_traces_skip_the_working_and_box_the_right_answer(grader):
    df = generate_problems(60, 4, seed=3, families=["arithmetic", "word_problem", "modular"], difficulty=(1, 2))
    df = df[df.split == "train"]
    clean = make_traces(df, 0.5, seed=3)
    mixed = make_traces(df, 0.5, seed=3, direct_answer_rate=0.3)
    direct = mixed.response.str.match(r"<think>\n</think>\n\n")
    assert 0.15 < direct.mean() < 0.45
    assert (mixed.response[~direct] == clean.response[~direct]).all()  # their own random stream
    assert not clean.response.str.match(r"<think>\n</think>").any()
    grades = grader.grade(list(mixed.response[direct]), list(mixed.answer[direct]))
    assert all(g.correct for g in grades)


# --------------------------------------------------------------------- loaders
def _write(tmp_path, name, rows):
    path = tmp_path / name
    df = pd.DataFrame(rows)
    if name.endswith(".parquet"):
        df.to_parquet(path)
    else:
        df.to_json(path, orient="records", lines=True)
    return str(path)


def test_gsm8k_preset_from_local_jsonl(tmp_path):
    path = _write(tmp_path, "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A big one?", "answer": "lots\n#### 1,234"},
    ])
    df = load_problem_set(DatasetSpec(name="gsm8k", path=path, preset="gsm8k"))
    assert list(df.answer) == ["7", "1234"]
    assert df.solution.iloc[0].startswith("3 + 4")
    assert set(df.source) == {"gsm8k"} and set(df.split) == {"eval"}
    assert df.problem_id.is_unique


def test_math500_preset_from_local_parquet(tmp_path):
    path = _write(tmp_path, "math500.parquet", [
        {"problem": "What is $1+1$?", "answer": "2", "solution": "$1+1=\\boxed{2}$", "level": 1, "subject": "x"},
        {"problem": "Half of 1?", "answer": "\\frac{1}{2}", "solution": "\\boxed{\\frac12}", "level": 3, "subject": "y"},
    ])
    df = load_problem_set(DatasetSpec(name="math500", path=path, preset="math500"))
    assert list(df.difficulty) == [1, 3]
    assert df.answer.iloc[1] == "\\frac{1}{2}"


def test_aime_preset_accepts_capitalised_columns_and_int_answers(tmp_path):
    path = _write(tmp_path, "aime.jsonl", [{"Problem": "Find N.", "Answer": 204, "Solution": "..."}])
    df = load_problem_set(DatasetSpec(name="aime24", path=path, preset="aime"))
    assert df.answer.iloc[0] == "204" and df.solution.iloc[0] == "..."


def test_custom_column_mapping_and_limit(tmp_path):
    path = _write(tmp_path, "mine.jsonl", [{"q": f"p{i}", "a": str(i), "s": None} for i in range(5)])
    spec = DatasetSpec(name="mine", path=path, problem_column="q", answer_column="a", solution_column="s", limit=3)
    df = load_problem_set(spec)
    assert len(df) == 3 and df.solution.isna().all()


def test_missing_column_error_names_file_and_column(tmp_path):
    path = _write(tmp_path, "bad.jsonl", [{"question": "x", "final": "1"}])
    with pytest.raises(ValueError) as e:
        load_problem_set(DatasetSpec(name="bad", path=path, problem_column="question", answer_column="answer"))
    assert "bad.jsonl" in str(e.value) and "answer" in str(e.value)


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problem_set(DatasetSpec(name="x", path=str(tmp_path / "nope.jsonl")))


def test_split_train_eval_is_stable_and_disjoint(tmp_path):
    path = _write(tmp_path, "set.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(400)])
    df = split_train_eval(load_problem_set(DatasetSpec(name="set", path=path, solution_column=None)), 0.25)
    again = split_train_eval(df, 0.25)
    assert list(df.split) == list(again.split)
    assert 60 < (df.split == "eval").sum() < 140
    assert not set(df[df.split == "eval"].problem_id) & set(df[df.split == "train"].problem_id)
