"""jobs.evaluate: avg@k / pass@k / lengths per benchmark from real samples and real math-verify verdicts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from compaction.params import DatasetSpec


@pytest.fixture(scope="module")
def local_bench(tmp_path_factory, smoke_data):
    """A GSM8K-layout jsonl file standing in for a hub benchmark (nothing here can reach a hub)."""
    problems = pd.read_parquet(smoke_data["problems"])
    ev = problems[problems["split"] == "eval"].head(3)
    path = tmp_path_factory.mktemp("bench") / "gsm8k.jsonl"
    pd.DataFrame({"question": ev["problem"], "answer": [f"work\n#### {a}" for a in ev["answer"]]}).to_json(
        path, orient="records", lines=True)
    return path


def test_metrics_are_what_the_parquet_files_say(smoke_params, smoke_data, tiny_model, local_bench, tmp_path):
    from jobs import evaluate

    params = smoke_params.model_copy(deep=True)
    params.eval.benchmarks = [DatasetSpec(name="gsm8k", path=str(local_bench), preset="gsm8k")]
    out = tmp_path / "eval"
    metrics = json.loads(open(evaluate.run(params, tiny_model, smoke_data["problems"], out)).read())

    n_eval = int((pd.read_parquet(smoke_data["problems"])["split"] == "eval").sum())
    for bench, n_problems in (("synthetic", n_eval), ("gsm8k", 3)):
        rollouts = pd.read_parquet(out / bench / "rollouts.parquet")
        grades = pd.read_parquet(out / bench / "grades.parquet")
        assert len(rollouts) == n_problems * params.eval.k
        assert list(grades["rollout_id"]) == list(rollouts["rollout_id"])
        assert set(rollouts["temperature"]) == {params.eval.temperature}
        by_problem = grades.groupby("problem_id")["correct"].max()
        assert metrics[f"eval/{bench}/accuracy"] == pytest.approx(grades["correct"].mean())
        assert metrics[f"eval/{bench}/pass@k"] == pytest.approx(by_problem.mean())
        assert metrics[f"eval/{bench}/mean_response_tokens"] == pytest.approx(rollouts["response_tokens"].mean())
        assert metrics[f"eval/{bench}/truncation_rate"] == pytest.approx((rollouts["finish_reason"] == "length").mean())
        assert metrics[f"eval/{bench}/problems"] == n_problems
    # No half-written folder next to the result.
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


def test_a_graded_response_counts_as_correct(smoke_params, smoke_data, tmp_path):
    """The verdicts are math-verify's: a model whose samples are the reference solutions scores 1."""
    from jobs.evaluate import benchmark_metrics

    problems = pd.read_parquet(smoke_data["problems"]).query("split == 'eval'").head(4)
    from compaction.grading import grade_rollouts

    rollouts = pd.DataFrame({
        "rollout_id": [f"r{i}" for i in range(8)], "problem_id": list(problems["problem_id"]) * 2,
        "response": list(problems["solution"]) + ["no answer here"] * 4,
        "response_tokens": [10] * 4 + [20] * 4, "finish_reason": ["stop"] * 4 + ["length"] * 4,
    })
    grades = grade_rollouts(rollouts, problems[["problem_id", "answer"]], workers=1)
    m = benchmark_metrics("x", rollouts, grades, ["wait"])
    assert m["eval/x/accuracy"] == 0.5 and m["eval/x/pass@k"] == 1.0
    assert m["eval/x/mean_response_tokens"] == 15 and m["eval/x/truncation_rate"] == 0.5


def test_bad_benchmark_fails_before_sampling(smoke_params, smoke_data, tiny_model, tmp_path):
    from jobs import evaluate

    params = smoke_params.model_copy(deep=True)
    params.eval.benchmarks = [DatasetSpec(name="math500", path=str(tmp_path / "missing.jsonl"), preset="math500")]
    with pytest.raises(Exception, match="missing.jsonl"):
        evaluate.run(params, tiny_model, smoke_data["problems"], tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
