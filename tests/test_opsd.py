"""OPSD: student/teacher alignment, selection by condition, the privileged context, rounds and
their files, teacher variants (frozen, live, ema, LoRA), and the redundancy map."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from compaction.data import GRADE_COLUMNS, ROLLOUT_COLUMNS

REPO = Path(__file__).resolve().parents[1]
# One small round: 3 prompts x 2 samples of at most 24 tokens.
SMALL = ["opsd.unit=rollout", "opsd.rounds=1", "opsd.prompts_per_round=3", "opsd.samples_per_prompt=2", "opsd.max_new_tokens=24",
         "opsd.redundancy_map_samples=3"]
METRICS = ("loss", "selected_fraction", "accuracy", "mean_response_tokens", "p90_response_tokens",
           "truncation_rate", "epistemic_rate", "divergence_mean", "divergence_p50", "divergence_p90",
           "divergence_max", "grad_norm", "seconds", "empty_round")


def opsd_params(smoke_params, *sets):
    from compaction.params import load_params

    return load_params(REPO / "params" / "smoke.yaml", [*SMALL, *sets], base=Path(smoke_params.paths.root))


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


@pytest.fixture(scope="module")
def lm(tiny_model):
    from compaction.model import load_model, load_tokenizer

    model = load_model(tiny_model, dtype="float32").eval()
    return load_tokenizer(tiny_model, padding_side="right"), model


@pytest.fixture(scope="module")
def train_problems(smoke_data):
    from compaction.data import load_problems

    return load_problems(smoke_data["problems"], "train")


def fake_rollouts(tokenizer, problems: pd.DataFrame, responses: list[str]) -> pd.DataFrame:
    """Rollouts as the job holds them (student prompt, sampled ids) with the given texts as y."""
    from compaction.model import build_prompt, build_student_messages

    rows = []
    for i, ((_, p), text) in enumerate(zip(problems.iterrows(), responses)):
        y = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"rollout_id": f"r{i}", "problem_id": p["problem_id"], "response": text,
                     "prompt": build_prompt(tokenizer, build_student_messages(p["problem"])),
                     "response_token_ids": y, "response_tokens": len(y)})
    return pd.DataFrame(rows)


RESPONSES = ["<think>\n3 + 4 = 7. Wait, let me check: 3 + 4 = 7.\n</think>\nThe answer is $\\boxed{7}$.",
             "x = 2", "Hmm. 12 / 4 = 3, so the answer is $\\boxed{3}$. Let me verify that again."]


# --------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "sampled_token"])
def test_identical_prompts_and_weights_give_zero_divergence(lm, train_problems, kind):
    from compaction.distillation import DistillationStudent, build_pairs, pack_pairs, response_hidden
    from compaction.scoring import lm_head_weight

    tokenizer, model = lm
    rollouts = fake_rollouts(tokenizer, train_problems.head(3), RESPONSES)
    same_prompt = dict(zip(rollouts["problem_id"], rollouts["prompt"]))  # the teacher sees what the student sees
    pairs = build_pairs(tokenizer, rollouts, same_prompt)
    student_batch, teacher_batch = pack_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        t_rows, t_targets = response_hidden(model, teacher_batch)
    student = DistillationStudent(model, kind, beta=0.5, temperature=1.0, clip=None, backend="torch")
    values = student(**student_batch, teacher_hidden=t_rows, teacher_weight=lm_head_weight(model),
                     teacher_targets=t_targets)
    assert values.shape == (sum(p.n_tokens for p in pairs),)
    assert values.abs().max().item() < 1e-6


def test_gathered_rows_give_the_plain_forward_logprobs(lm, train_problems, smoke_params):
    from compaction.distillation import build_pairs, pack_pairs, response_hidden, teacher_prompt
    from compaction.scoring import lm_head_weight
    from kernels import linear_logprobs

    tokenizer, model = lm
    problems = train_problems.head(3)
    rollouts = fake_rollouts(tokenizer, problems, RESPONSES)
    prompts = {p["problem_id"]: teacher_prompt(tokenizer, smoke_params.opsd, p, True) for _, p in problems.iterrows()}
    pairs = build_pairs(tokenizer, rollouts, prompts)
    student_batch, teacher_batch = pack_pairs(pairs, tokenizer.pad_token_id)
    for batch, side in ((student_batch, "student"), (teacher_batch, "teacher")):
        with torch.no_grad():
            rows, targets = response_hidden(model, batch)
            gathered = linear_logprobs(rows, lm_head_weight(model), targets, backend="torch")
            expected = []
            for p in pairs:  # one unpadded sequence at a time, full logits
                ids, start = getattr(p, f"{side}_ids"), getattr(p, f"{side}_start")
                logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
                y = torch.tensor(ids[start:])
                expected.append(logp[start - 1: len(ids) - 1].gather(1, y[:, None])[:, 0])
        torch.testing.assert_close(gathered, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_teacher_sees_the_privileged_context_and_the_same_response(lm, train_problems, smoke_params):
    from compaction.distillation import build_pairs, pack_pairs, response_rows, teacher_prompt

    tokenizer, _ = lm
    problems = train_problems.head(3)
    rollouts = fake_rollouts(tokenizer, problems, RESPONSES)
    prompts = {p["problem_id"]: teacher_prompt(tokenizer, smoke_params.opsd, p, True) for _, p in problems.iterrows()}
    pairs = build_pairs(tokenizer, rollouts, prompts)
    for pair, (_, problem), (_, rollout) in zip(pairs, problems.iterrows(), rollouts.iterrows()):
        student_text = tokenizer.decode(pair.student_ids[:pair.student_start])
        teacher_text = tokenizer.decode(pair.teacher_ids[:pair.teacher_start])
        assert problem["problem"] in student_text and problem["problem"] in teacher_text
        assert problem["solution"] in teacher_text and problem["solution"] not in student_text
        assert "<|im_start|>assistant" in teacher_text  # the model's own chat template
        y = list(rollout["response_token_ids"])
        assert pair.student_ids[pair.student_start:] == y == pair.teacher_ids[pair.teacher_start:]
        assert pair.teacher_start > pair.student_start
    student_batch, teacher_batch = pack_pairs(pairs, tokenizer.pad_token_id)
    hidden = torch.zeros(len(pairs), student_batch["input_ids"].shape[1], 1)
    _, s_targets = response_rows(hidden, student_batch["input_ids"], student_batch["score_mask"])
    hidden = torch.zeros(len(pairs), teacher_batch["input_ids"].shape[1], 1)
    _, t_targets = response_rows(hidden, teacher_batch["input_ids"], teacher_batch["score_mask"])
    all_y = torch.tensor([t for y in rollouts["response_token_ids"] for t in y])
    assert torch.equal(s_targets, all_y) and torch.equal(t_targets, all_y)


# --------------------------------------------------------------------------- privileged context
def test_privileged_context_kinds_and_fallback(smoke_params):
    from compaction.distillation import privileged_context

    row = {"problem_id": "p1", "problem": "What is 2 + 2?", "solution": "2 + 2 = 4. $\\boxed{4}$", "answer": "4"}
    cfg = smoke_params.opsd.model_copy()
    assert privileged_context(cfg, row) == "Reference solution:\n2 + 2 = 4. $\\boxed{4}$"
    cfg.context = "answer"
    assert privileged_context(cfg, row) == "Reference answer: 4"
    cfg.context_template = "Known: {answer} ({solution}) for {problem} {{literal}}"
    cfg.context = "template"
    assert privileged_context(cfg, row) == "Known: 4 (2 + 2 = 4. $\\boxed{4}$) for What is 2 + 2? {literal}"
    no_solution = {**row, "solution": None}
    cfg.missing_solution = "answer"
    assert privileged_context(cfg, no_solution) == "Reference answer: 4"
    cfg.context, cfg.missing_solution = "solution", "error"
    with pytest.raises(ValueError, match="p1"):
        privileged_context(cfg, no_solution)


def test_missing_solution_error_names_the_problem_before_any_work(smoke_params, smoke_data, tiny_model, tmp_path):
    from compaction.data import load_problems, write_problems
    from jobs import opsd

    problems = load_problems(smoke_data["problems"])
    victim = problems.index[problems["split"] == "train"][5]
    problems.loc[victim, "solution"] = None
    path = write_problems(problems, tmp_path / "problems.parquet")
    params = opsd_params(smoke_params, "opsd.missing_solution=error")
    with pytest.raises(ValueError, match=problems.loc[victim, "problem_id"]):
        opsd.run(params, tiny_model, str(path), tmp_path / "out", "correct")
    assert not (tmp_path / "out").exists()


def test_unknown_template_placeholder_fails_before_any_work(smoke_params, smoke_data, tiny_model, tmp_path):
    from jobs import opsd

    params = opsd_params(smoke_params, "opsd.context=template", "opsd.context_template='{problem} Hint: {hint}'")
    with pytest.raises(ValueError, match=r"\{hint\}"):
        opsd.run(params, tiny_model, smoke_data["problems"], tmp_path / "out", "all")
    assert not (tmp_path / "out").exists()


def test_baseline_returns_the_policy_unchanged(smoke_params, smoke_data, tiny_model, tmp_path):
    from jobs import opsd

    assert opsd.run(opsd_params(smoke_params), tiny_model, smoke_data["problems"], tmp_path / "out",
                    "baseline") == tiny_model
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- selection
def graded_groups(passes: list[int], size: int = 4) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rollouts in groups of ``size``; group g has passes[g] correct rollouts."""
    rows, grades = [], []
    for g, n_correct in enumerate(passes):
        for k in range(size):
            rid = f"g{g}s{k}"
            rows.append({"rollout_id": rid, "problem_id": f"p{g}", "group": g})
            grades.append({"rollout_id": rid, "problem_id": f"p{g}", "correct": k < n_correct,
                           "status": "ok" if k < n_correct + 1 else "no_answer"})
    return pd.DataFrame(rows), pd.DataFrame(grades).sample(frac=1.0, random_state=0)  # grades joined by id


def test_each_condition_selects_exactly_its_rollouts():
    from compaction.selection import select_rollouts

    rollouts, grades = graded_groups([4, 2, 1, 0])  # pass rates 1, .5, .25, 0
    verdict = dict(zip(grades["rollout_id"], grades["correct"]))
    ids = lambda df: list(df["rollout_id"])  # noqa: E731

    def pick(condition, unit="rollout", threshold=0.5):
        return select_rollouts(rollouts, grades, condition, unit, threshold)

    every = list(rollouts["rollout_id"])
    assert ids(pick("all")) == every and ids(pick("all", "group")) == every
    assert ids(pick("correct")) == [r for r in every if verdict[r]]
    assert ids(pick("incorrect")) == [r for r in every if not verdict[r]]
    in_groups = lambda gs: [r for r, g in zip(every, rollouts["group"]) if g in gs]  # noqa: E731
    assert ids(pick("correct", "group")) == in_groups({0, 1})  # pass rate >= .5, whole groups
    assert ids(pick("incorrect", "group")) == in_groups({2, 3})  # the complement
    assert ids(pick("correct", "group", 0.75)) == in_groups({0})
    assert ids(pick("incorrect", "group", 0.75)) == in_groups({1, 2, 3})
    sel = pick("correct")
    assert list(sel.columns) == ["rollout_id", "problem_id", "group", "correct", "status", "group_pass_rate"]
    assert sel["correct"].all() and list(sel["status"]) == ["ok"] * len(sel)
    with pytest.raises(ValueError, match="condition"):
        pick("baseline")


# --------------------------------------------------------------------------- real rounds
@pytest.fixture(scope="module")
def frozen_run(smoke_params, smoke_data, tiny_model, tmp_path_factory):
    """One round, frozen teacher, reverse KL, condition `incorrect` by rollout."""
    from jobs import opsd

    out = tmp_path_factory.mktemp("opsd") / "incorrect"
    final = opsd.run(opsd_params(smoke_params), tiny_model, smoke_data["problems"], out, "incorrect")
    return out, final


def test_a_round_writes_its_files_and_metrics(frozen_run, tiny_model):
    from compaction.redundancy_map import MAP_COLUMNS
    from compaction.selection import select_rollouts

    out, final = frozen_run
    r = out / "round-0000"
    assert final == str(out / "final") and Path(final, "config.json").is_file()
    # A round's folder is its record only: no model, no optimizer state.
    assert {p.name for p in r.iterdir()} == {"rollouts.parquet", "grades.parquet", "selected.parquet", "metrics.json",
                                             "redundancy_map.parquet"}
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-00000001"]
    assert not list(out.glob(".*tmp")) and not list((out / "checkpoints").glob(".*tmp"))
    ro, gr, sel = (pd.read_parquet(r / f) for f in ("rollouts.parquet", "grades.parquet", "selected.parquet"))
    assert set(ROLLOUT_COLUMNS) <= set(ro.columns) and list(gr.columns) == list(GRADE_COLUMNS)
    assert len(ro) == 3 * 2 and list(ro["rollout_id"]) == list(gr["rollout_id"])
    assert all(len(ids) == n for ids, n in zip(ro["response_token_ids"], ro["response_tokens"]))
    # The round trained on exactly the rollouts its verdicts select.
    assert list(sel["rollout_id"]) == list(gr.loc[~gr["correct"], "rollout_id"])
    pd.testing.assert_frame_equal(sel, select_rollouts(ro, gr, "incorrect", "rollout"))
    m = json.loads((r / "metrics.json").read_text())
    for key in METRICS:
        assert f"opsd/{key}" in m, key
    assert m["opsd/selected_fraction"] == len(sel) / len(ro)
    assert m["opsd/selected_tokens"] == ro.loc[ro["rollout_id"].isin(sel["rollout_id"]), "response_tokens"].sum()
    assert len(sel) > 0  # the random smoke model answers nothing right: `incorrect` selects every rollout
    assert m["opsd/empty_round"] == 0 and m["opsd/grad_norm"] > 0
    assert m["opsd/loss"] == pytest.approx(m["opsd/divergence_mean"], rel=1e-5)
    a, b = weights(tiny_model), weights(final)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the student moved
    # The redundancy map: a seeded choice of the round's rollouts, every token of each, in order.
    rmap = pd.read_parquet(r / "redundancy_map.parquet")
    assert set(MAP_COLUMNS) <= set(rmap.columns) and rmap["rollout_id"].nunique() == 3
    for rid, g in rmap.groupby("rollout_id"):
        ids = list(ro.loc[ro["rollout_id"] == rid, "response_token_ids"].iloc[0])
        assert list(g["position"]) == list(range(len(ids))) and list(g["token_id"]) == ids
    assert np.isfinite(rmap["divergence"]).all() and (rmap["divergence"] >= -1e-6).all()


def test_rounds_of_one_job_sample_anew_and_map_the_same_rollouts(smoke_params, smoke_data, tiny_model, tmp_path):
    from jobs import opsd

    out = tmp_path / "out"
    params = opsd_params(smoke_params, "opsd.rounds=2")
    final = opsd.run(params, tiny_model, smoke_data["problems"], out, "incorrect")
    assert final == str(out / "final")
    r0, r1 = (pd.read_parquet(out / f"round-000{k}" / "rollouts.parquet") for k in (0, 1))
    assert set(r0["rollout_id"]).isdisjoint(r1["rollout_id"]) and (r1["round"] == 1).all()
    assert set(r1["policy_ref"]) == {f"{out}@1"}  # the stage's policy after one round, in memory
    # The redundancy map scores the same round-0 rollouts in every round.
    m0, m1 = (pd.read_parquet(out / f"round-000{k}" / "redundancy_map.parquet") for k in (0, 1))
    assert list(m0["rollout_id"]) == list(m1["rollout_id"]) and list(m0["token_id"]) == list(m1["token_id"])
    # A finished stage returns at once: nothing is rewritten.
    stamp = (out / "round-0001" / "metrics.json").stat().st_mtime_ns
    assert opsd.run(params, tiny_model, smoke_data["problems"], out, "incorrect") == final
    assert (out / "round-0001" / "metrics.json").stat().st_mtime_ns == stamp


def test_ema_teacher_round(smoke_params, smoke_data, tiny_model, tmp_path):
    from jobs import opsd

    params = opsd_params(smoke_params, "opsd.teacher=ema", "opsd.ema_decay=0.9", "opsd.divergence=jsd",
                         "opsd.unit=group", "opsd.lr=1e-2")
    final = opsd.run(params, tiny_model, smoke_data["problems"], tmp_path / "out", "all")
    r = tmp_path / "out" / "round-0000"
    ckpt = tmp_path / "out" / "checkpoints" / "step-00000001" / opsd.TEACHER_FILE
    policy, student = weights(tiny_model), weights(final)
    teacher = {k: v for k, v in load_file(str(ckpt)).items() if k in policy}  # tied weights are stored once
    assert len(teacher) >= len(policy) - 1
    m = json.loads((r / "metrics.json").read_text())
    assert m["opsd/empty_round"] == 0 and m["opsd/selected_fraction"] == 1.0
    # One optimizer step: teacher = 0.9 * starting policy + 0.1 * new student.
    for k in teacher:
        torch.testing.assert_close(teacher[k], 0.9 * policy[k] + 0.1 * student[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(policy[k], teacher[k]) for k in teacher)


CLIP = 0.05  # per-token sampled-token values of the random smoke model reach ~0.1-1


def test_live_teacher_round_with_answer_context(smoke_params, smoke_data, tiny_model, tmp_path):
    from jobs import opsd

    params = opsd_params(smoke_params, "opsd.teacher=live", "opsd.divergence=sampled_token", "opsd.context=answer",
                         f"opsd.clip={CLIP}", "opsd.unit=group", "opsd.redundancy_map_samples=0")
    final = opsd.run(params, tiny_model, smoke_data["problems"], tmp_path / "out", "incorrect")
    r = tmp_path / "out" / "round-0000"
    m = json.loads((r / "metrics.json").read_text())
    gr, sel = pd.read_parquet(r / "grades.parquet"), pd.read_parquet(r / "selected.parquet")
    ro = pd.read_parquet(r / "rollouts.parquet")
    rate = gr.groupby(ro["group"].to_numpy())["correct"].mean()
    assert set(sel["group"]) == set(rate.index[rate < 0.5])  # incorrect by group: pass rate below the threshold
    assert not (r / "teacher").exists() and not (r / "redundancy_map.parquet").exists()
    # The clip is below the largest per-token value, so it cuts: the round's maximum is the clip.
    assert m["opsd/empty_round"] == 0 and m["opsd/divergence_max"] == pytest.approx(CLIP, rel=1e-6)
    assert m["opsd/divergence_p50"] < CLIP
    assert Path(final, "config.json").is_file()


def test_micro_batches_sorted_by_length_keep_every_item_once():
    from compaction.training import micro_batches

    items = ["ccc", "a", "bb", "dddd", "e", "ff"]
    batches = micro_batches(items, 4, length=len)
    assert batches == [["a", "e", "bb", "ff"], ["ccc", "dddd"]]  # stable: equal lengths keep their order
    assert micro_batches(items, 4) == [items[:4], items[4:]]


def test_micro_batch_size_does_not_change_the_step(smoke_params, smoke_data, tiny_model, tmp_path):
    """The update's micro-batches (sorted by length) only split the sum: one sequence per forward
    pass or all in one give the same loss and the same new weights."""
    from jobs import opsd

    runs = {}
    for size in (1, 64):
        params = opsd_params(smoke_params, f"opsd.micro_batch_size={size}", "opsd.redundancy_map_samples=0")
        final = opsd.run(params, tiny_model, smoke_data["problems"], tmp_path / str(size), "all")
        m = json.loads((tmp_path / str(size) / "round-0000" / "metrics.json").read_text())
        runs[size] = m, weights(final)
    (m1, w1), (m64, w64) = runs[1], runs[64]
    assert m1["opsd/selected_rollouts"] == 6 and m1["opsd/loss"] > 0
    assert m1["opsd/loss"] == pytest.approx(m64["opsd/loss"], rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w64[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(w1[k], b) for k, b in weights(tiny_model).items())  # a step was taken


def test_empty_round_keeps_the_model_and_writes_its_folder(smoke_params, smoke_data, tiny_model, tmp_path):
    from jobs import opsd

    # The random-weight smoke model answers nothing correctly: `correct` selects nothing.
    final = opsd.run(opsd_params(smoke_params), tiny_model, smoke_data["problems"], tmp_path / "out", "correct")
    r = tmp_path / "out" / "round-0000"
    gr, sel = pd.read_parquet(r / "grades.parquet"), pd.read_parquet(r / "selected.parquet")
    assert list(sel["rollout_id"]) == list(gr.loc[gr["correct"], "rollout_id"])
    assert not gr["correct"].any()  # the premise: nothing to select
    m = json.loads((r / "metrics.json").read_text())
    assert m["opsd/empty_round"] == 1 and m["opsd/loss"] == 0 and len(sel) == 0
    a, b = weights(tiny_model), weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_round_saves_a_merged_model_and_the_adapter(smoke_params, smoke_data, tiny_model, tmp_path):
    from peft import PeftModel

    from compaction.distillation import build_pairs, pack_pairs, response_hidden
    from compaction.model import load_model
    from jobs import opsd

    params = opsd_params(smoke_params, "opsd.lora=true", "opsd.lora_rank=4", "opsd.lr=1e-2")
    final = opsd.run(params, tiny_model, smoke_data["problems"], tmp_path / "out", "all")
    r = tmp_path / "out" / "round-0000"
    assert (Path(final) / "adapter" / "adapter_config.json").is_file()
    merged = load_model(final, dtype="float32").eval()  # final/ is a plain HF checkpoint
    base = load_model(tiny_model, dtype="float32").eval()
    adapted = PeftModel.from_pretrained(load_model(tiny_model, dtype="float32"), str(Path(final) / "adapter")).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits)
    # A job resumed from the checkpoint has the trained adapter, and its frozen teacher is the base
    # (adapter disabled).
    nxt = opsd.OPSDStage(params, tiny_model, smoke_data["problems"], tmp_path / "out", "all")
    nxt.setup()
    assert nxt.resume() == 1
    nxt.close()
    ro = pd.read_parquet(r / "rollouts.parquet").head(2)
    pairs = build_pairs(nxt.tokenizer, ro, nxt.teacher_prompts(ro["problem_id"].unique()))
    student_batch, teacher_batch = pack_pairs(pairs, nxt.tokenizer.pad_token_id)
    t_rows, _, _ = nxt.teacher_rows(teacher_batch)
    with torch.no_grad():
        torch.testing.assert_close(t_rows, response_hidden(base, teacher_batch)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(response_hidden(nxt.policy, student_batch)[0],
                                   response_hidden(merged, student_batch)[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- redundancy map
def test_redundancy_map_html_escapes_model_text(tmp_path, frozen_run):
    from cli.main import main
    from compaction.redundancy_map import render_html

    df = pd.DataFrame({"rollout_id": ["a"] * 3 + ["b"], "position": [0, 1, 2, 0],
                       "token": ["<script>alert(1)</script>", ' & "x"', "\n", "wait"],
                       "divergence": [0.1, 2.0, 0.0, 5.0], "correct": [True] * 3 + [False]})
    page = render_html(df)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&amp; &quot;x&quot;" in page and "incorrect" in page and 'class="legend"' in page
    assert page.index("rollout a") < page.index("rollout b")
    out, _ = frozen_run
    html_path = tmp_path / "map.html"
    assert main(["redundancy-map", str(out / "round-0000"), "--out", str(html_path)]) == 0
    text = html_path.read_text()
    assert text.startswith("<!doctype html>") and text.count('class="rollout"') == 3


# --------------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_two_processes_take_the_same_opsd_step_as_one(smoke_data, tiny_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # One prompt per generation chunk, so both processes sample and train (3 chunks: 2 + 1).
    sets = [a for o in [*SMALL, "rollout.batch_size=2", "opsd.micro_batch_size=2"] for a in ("--set", o)]

    def cmd(launcher, out):
        return [*launcher, "jobs.opsd", "--params", "params/smoke.yaml", *sets, "--policy", tiny_model,
                "--problems", smoke_data["problems"], "--out", str(out), "--condition", "all"]

    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(cmd((sys.executable, "-m"), one), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launcher = (accelerate, "launch", "--config_file", "params/accelerate/cpu-2proc.yaml", "-m")
    r = subprocess.run(cmd(launcher, two), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r1, r2 = one / "round-0000", two / "round-0000"
    for name in ("rollouts.parquet", "selected.parquet", "redundancy_map.parquet"):
        a, b = pd.read_parquet(r1 / name), pd.read_parquet(r2 / name)
        a, b = (f.drop(columns=[c for c in ("rollout_id", "policy_ref") if c in f.columns]) for f in (a, b))
        if name == "redundancy_map.parquet":  # ids and policy_ref name the stage folder, which differs
            assert list(a["token_id"]) == list(b["token_id"])
            np.testing.assert_allclose(a["divergence"], b["divergence"], rtol=1e-3, atol=1e-6)
        else:
            pd.testing.assert_frame_equal(a, b)
    m1, m2 = json.loads((r1 / "metrics.json").read_text()), json.loads((r2 / "metrics.json").read_text())
    assert m2["opsd/loss"] == pytest.approx(m1["opsd/loss"], rel=1e-4, abs=1e-7)
    assert m2["opsd/divergence_p90"] == pytest.approx(m1["opsd/divergence_p90"], rel=1e-4, abs=1e-7)
    a, b = weights(one / "final"), weights(two / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- prompt pools
def test_group_filtering_keeps_prompts_by_pass_rate_and_partitions_all():
    from compaction.selection import prompt_pool

    grades = pd.DataFrame({"problem_id": list("aaaabbbbccccdddd"),
                           "correct": [1, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]}).astype({"correct": bool})
    pools = {c: prompt_pool(grades, c, 0.5) for c in ("all", "correct", "incorrect")}
    assert list(pools["all"]["problem_id"]) == list("abcd")
    assert list(pools["all"]["pass_rate"]) == [0.75, 0.5, 0.25, 0.0] and set(pools["all"]["samples"]) == {4}
    assert list(pools["correct"]["problem_id"]) == ["a", "b"]  # >= threshold
    assert list(pools["incorrect"]["problem_id"]) == ["c", "d"]  # below it
    assert list(prompt_pool(grades, "correct", 0.75)["problem_id"]) == ["a"]
    with pytest.raises(ValueError, match="condition"):
        prompt_pool(grades, "baseline", 0.5)


def test_pool_candidates_are_a_seeded_subset_in_train_order(train_problems):
    from compaction.selection import pool_candidates

    a, b = pool_candidates(train_problems, 10, 0), pool_candidates(train_problems, 10, 0)
    assert list(a["problem_id"]) == list(b["problem_id"]) and len(a) == 10
    position = {pid: i for i, pid in enumerate(train_problems["problem_id"])}
    assert [position[p] for p in a["problem_id"]] == sorted(position[p] for p in a["problem_id"])
    assert list(pool_candidates(train_problems, 10, 1)["problem_id"]) != list(a["problem_id"])
    assert len(pool_candidates(train_problems, None, 0)) == train_problems["problem_id"].nunique()


def test_unit_pool_trains_on_its_pool_prompts_only(smoke_params, smoke_data, tiny_model, train_problems, tmp_path):
    from jobs import opsd

    params = opsd_params(smoke_params, "opsd.unit=pool", "opsd.rounds=2", "opsd.redundancy_map_samples=0")
    pool = train_problems.head(2)[["problem_id"]]
    pool.to_parquet(tmp_path / "pool.parquet")
    # Without its pool, a `correct` job under unit=pool fails before any work, naming the fix.
    with pytest.raises(ValueError, match="opsd.unit=pool.*--pool"):
        opsd.run(params, tiny_model, smoke_data["problems"], tmp_path / "nopool", "correct")
    assert not (tmp_path / "nopool").exists()
    final = opsd.run(params, tiny_model, smoke_data["problems"], tmp_path / "out", "correct",
                     pool_path=str(tmp_path / "pool.parquet"))
    for k in (0, 1):
        r = tmp_path / "out" / f"round-000{k}"
        ro, sel = pd.read_parquet(r / "rollouts.parquet"), pd.read_parquet(r / "selected.parquet")
        assert set(ro["problem_id"]) <= set(pool["problem_id"])
        assert list(sel["rollout_id"]) == list(ro["rollout_id"])  # every rollout of a pool prompt, whatever its verdict
    assert Path(final, "config.json").is_file()
    # An empty pool: every round is empty and the model is unchanged.
    pool.head(0).to_parquet(tmp_path / "empty.parquet")
    final = opsd.run(params, tiny_model, smoke_data["problems"], tmp_path / "empty", "correct",
                     pool_path=str(tmp_path / "empty.parquet"))
    m = json.loads((tmp_path / "empty" / "round-0001" / "metrics.json").read_text())
    assert m["opsd/empty_round"] == 1 and m["opsd/selected_rollouts"] == 0
    a, b = weights(tiny_model), weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a)
