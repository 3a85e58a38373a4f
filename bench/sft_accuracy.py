"""SFT, RLVR and OPSD accuracy on the embedded domain: train, then avg@k on the eval split, per family.

    .venv/bin/python bench/sft_accuracy.py [--params params/demo.yaml] [--set key=value ...] [--home DIR]
                                           [--rlvr] [--opsd all correct incorrect]

With ``--rlvr`` the RLVR rounds of the params run after SFT and are evaluated the same way
(issue 4's second bar: RLVR raises avg@8 by >= 10 points within 5 minutes). Stages are
cached by params hash under ``--home``, so rerunning with other RLVR settings reuses the SFT.

The tuning harness behind docs/tuning.md (issue 4's bar: >= 40% avg@8 at temperature 0.6,
SFT within 5 minutes on 2 cores). Prints SFT wall time, final loss, avg@k accuracy (graded by
math-verify) per family, mean response tokens, and the greedy error rate on result digits
(the digits right after `=` in the eval problems' concise traces): the arithmetic the model
has or has not learned. Baseline, side by side: the base model before SFT on the same digits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def result_digit_error(ckpt: str, problems) -> float:
    """Greedy next-token error on digits that follow '=' in concise traces (teacher forcing)."""
    from compaction.data.synthetic import make_traces
    from compaction.model import build_prompt, build_student_messages, load_model, load_tokenizer

    model, tok = load_model(ckpt).eval(), load_tokenizer(ckpt, padding_side="right")
    wrong = total = 0
    for problem, trace in zip(problems["problem"], make_traces(problems, 0.0)["response"]):
        p_ids = tok(build_prompt(tok, build_student_messages(problem)), add_special_tokens=False)["input_ids"]
        ids = p_ids + tok(trace, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
        toks = tok.convert_ids_to_tokens(ids)
        for t in range(len(p_ids), len(ids)):
            if toks[t].isdigit() and "=" in "".join(toks[max(0, t - 3): t]):
                total += 1
                wrong += pred[t - 1] != ids[t]
    return wrong / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--home", default=None, help="project folder (default: a temp dir)")
    ap.add_argument("--rlvr", action="store_true", help="also run the RLVR rounds and evaluate them")
    ap.add_argument("--opsd", nargs="*", default=[], choices=["all", "correct", "incorrect"],
                    help="then OPSD from the RLVR checkpoint under these conditions, each evaluated")
    args = ap.parse_args()

    from compaction.data import load_problems
    from compaction.grading import grade_responses
    from compaction.model import load_tokenizer
    from compaction.params import load_params
    from compaction.rollout import HFEngine, Sampling, generate_rollouts
    from jobs import opsd, prepare_data, prepare_model, rlvr, sft

    home = Path(args.home or tempfile.mkdtemp(prefix="sft-accuracy-"))
    params = load_params(args.params, args.overrides, base=home)
    refs = prepare_data.run(params)
    base = prepare_model.run(params, refs["problems"], refs["traces"])
    problems = load_problems(refs["problems"], "eval")
    sample = problems.head(150)
    base_err = result_digit_error(base, sample)

    def report(stage: str, ckpt: str, seconds: float) -> float:
        e = params.eval
        engine = HFEngine.from_pretrained(ckpt, batch_size=params.rollout.batch_size)
        rollouts = generate_rollouts(engine, load_tokenizer(ckpt), problems,
                                     Sampling(n=e.k, temperature=e.temperature, top_p=e.top_p,
                                              max_new_tokens=e.max_new_tokens, seed=e.seed), ckpt, progress=True)
        answers = dict(zip(problems["problem_id"], problems["answer"]))
        grades = grade_responses(list(rollouts["response"]), [answers[p] for p in rollouts["problem_id"]],
                                 workers=params.grading.workers)
        rollouts["correct"] = [g.correct for g in grades]
        rollouts["family"] = rollouts["problem_id"].map(dict(zip(problems["problem_id"], problems["family"])))
        print(f"\n{stage} {seconds:.0f} s -> {ckpt}")
        print(f"avg@{e.k} accuracy (T={e.temperature}): {rollouts['correct'].mean():.3f}; "
              f"mean response tokens {rollouts['response_tokens'].mean():.1f}; "
              f"truncated {(rollouts['finish_reason'] == 'length').mean():.3f}")
        print(f"result-digit greedy error: base {base_err:.3f} -> {stage} {result_digit_error(ckpt, sample):.3f}")
        print(rollouts.groupby("family")["correct"].mean().round(3).to_string())
        return float(rollouts["correct"].mean()), float(rollouts["response_tokens"].mean())

    t0 = time.perf_counter()
    ckpt = sft.run(params, base, refs["traces"], params.stage_dir("sft", params.section_hash("data", "model", "sft")))
    sft_acc, _ = report("SFT", ckpt, time.perf_counter() - t0)
    if args.rlvr or args.opsd:
        t0 = time.perf_counter()
        out = params.stage_dir("rlvr", params.section_hash("data", "model", "sft", "rlvr"))
        rl_ckpt = rlvr.run(params, ckpt, refs["problems"], out)
        rl_acc, rl_len = report("RLVR", rl_ckpt, time.perf_counter() - t0)
        print(f"\nRLVR - SFT: {100 * (rl_acc - sft_acc):+.1f} points avg@{params.eval.k}")
    pools = {}
    if args.opsd and params.opsd.unit == "pool":  # the flow's rollout grading and group filtering
        from compaction.artifacts import read_parquet, write_parquet
        from compaction.selection import prompt_pool
        from jobs import rollout_grading

        graded = Path(rollout_grading.run(params, rl_ckpt, refs["problems"], params.stage_dir(
            "rollout_grading", params.section_hash("data", "model", "sft", "rlvr", "opsd"))))
        for condition in args.opsd:
            pools[condition] = str(graded / f"pool-{condition}.parquet")
            write_parquet(prompt_pool(read_parquet(graded / "grades.parquet"), condition, params.opsd.group_threshold),
                          pools[condition])
    for condition in args.opsd:
        t0 = time.perf_counter()
        out = params.stage_dir(f"opsd-{condition}", params.section_hash("data", "model", "sft", "rlvr", "opsd"))
        o_ckpt = opsd.run(params, rl_ckpt, refs["problems"], out, condition, pools.get(condition))
        o_acc, o_len = report(f"OPSD-{condition}", o_ckpt, time.perf_counter() - t0)
        print(f"\nOPSD-{condition} vs RLVR: accuracy {100 * (o_acc - rl_acc):+.1f} points, "
              f"mean response tokens {100 * (o_len / rl_len - 1):+.1f}%")


if __name__ == "__main__":
    main()
