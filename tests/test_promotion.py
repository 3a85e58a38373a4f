"""The promotion gate: the rule, and its verdicts written to a real MLflow registry."""

from __future__ import annotations

import math

import mlflow
import pytest

from compaction.promotion import apply_promotion, benchmarks_of, decide_promotion


def m(**benches):
    """{"eval/<b>/accuracy": acc, "eval/<b>/mean_response_tokens": tokens} from b=(acc, tokens)."""
    out = {}
    for b, (acc, tok) in benches.items():
        out[f"eval/{b}/accuracy"], out[f"eval/{b}/mean_response_tokens"] = acc, tok
    return out


BASE = m(math500=(0.80, 1000.0), aime=(0.30, 4000.0))


def test_shorter_at_the_same_accuracy_is_promoted():
    ok, reason = decide_promotion(BASE, m(math500=(0.79, 700.0), aime=(0.31, 3000.0)), max_accuracy_drop=2.0)
    assert ok and reason.startswith("promoted:")
    assert "math500: accuracy 0.8000 -> 0.7900 (drop +1.00 pt" in reason and "(-30.0%)" in reason


@pytest.mark.parametrize("candidate, why", [
    (m(math500=(0.77, 700.0), aime=(0.31, 3000.0)), "math500: accuracy 0.8000 -> 0.7700 (drop +3.00 pt, tolerance 2), "
     "mean tokens 1000.0 -> 700.0 (-30.0%): accuracy drop 3.00 pt > 2"),
    (m(math500=(0.80, 1000.0), aime=(0.31, 3000.0)), "responses not shorter"),  # equal is not shorter
    (m(math500=(0.85, 1200.0), aime=(0.31, 3000.0)), "responses not shorter"),
    (m(math500=(0.80, 700.0)), "aime: missing or non-finite candidate eval/aime/accuracy, "
     "candidate eval/aime/mean_response_tokens"),
    (m(math500=(0.80, 700.0), aime=(math.nan, 3000.0)), "aime: missing or non-finite candidate eval/aime/accuracy"),
])
def test_a_failing_benchmark_blocks_promotion_and_is_named(candidate, why):
    ok, reason = decide_promotion(BASE, candidate, max_accuracy_drop=2.0)
    assert not ok and reason.startswith("not promoted:") and why in reason


def test_tolerance_boundary_and_benchmark_subset():
    assert decide_promotion(BASE, m(math500=(0.78, 900.0), aime=(0.28, 3900.0)), max_accuracy_drop=2.0)[0]
    assert not decide_promotion(BASE, m(math500=(0.78, 900.0), aime=(0.28, 3900.0)), max_accuracy_drop=1.9)[0]
    # Gate only math500: aime may drop.
    cand = m(math500=(0.80, 900.0), aime=(0.10, 3900.0))
    assert not decide_promotion(BASE, cand)[0]
    assert decide_promotion(BASE, cand, benchmarks=["math500"])[0]
    assert benchmarks_of(BASE) == ["aime", "math500"]
    assert decide_promotion({}, cand) == (False, "not promoted: no benchmark to compare (the baseline has no "
                                                 "eval/<bench>/accuracy metric)")
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        decide_promotion(BASE, cand, max_accuracy_drop=-1)


def test_verdicts_land_in_the_registry(project, tmp_path):
    """Versions made the orchestration layer's way (log_artifacts + create_model_version)."""
    from compaction import tracking
    from compaction.params import load_params

    params = load_params(None, ["tracking.experiment=reg", "tracking.system_metrics=false"], base=project)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    client.create_registered_model("compacted")
    versions = []
    for i in range(3):
        with tracking.start_run(params.tracking, f"opsd-{i}", tags={"stage": "opsd"}) as run:
            mlflow.log_artifacts(str(ckpt), "checkpoint")
        versions.append(client.create_model_version("compacted", f"runs:/{run.info.run_id}/checkpoint",
                                                    run_id=run.info.run_id).version)

    good = m(math500=(0.795, 650.0), aime=(0.30, 3100.0))
    bad = m(math500=(0.70, 500.0), aime=(0.20, 2000.0))
    ok, reason = apply_promotion("compacted", versions[0], BASE, good, max_accuracy_drop=2.0, client=client)
    assert ok
    assert client.get_model_version_by_alias("compacted", "candidate").version == versions[0]
    ok, reason = apply_promotion("compacted", versions[1], BASE, bad, max_accuracy_drop=2.0, client=client)
    assert not ok
    v1 = client.get_model_version("compacted", versions[1])
    assert v1.tags["promotion"] == reason and "accuracy drop 10.00 pt > 2" in reason
    assert v1.tags["promotion_passed"] == "false"
    # A failing version never takes the alias from the one that passed.
    assert client.get_model_version_by_alias("compacted", "candidate").version == versions[0]
    assert client.get_model_version("compacted", versions[0]).tags["promotion_passed"] == "true"
    # The next passing version takes it.
    assert apply_promotion("compacted", versions[2], BASE, good, client=client)[0]
    assert client.get_model_version_by_alias("compacted", "candidate").version == versions[2]
    with pytest.raises(mlflow.exceptions.MlflowException):
        apply_promotion("compacted", "99", BASE, good, client=client)
