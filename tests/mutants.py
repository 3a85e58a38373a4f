"""Deliberate breakages that the suite must catch: each mutant is applied to a throwaway copy of
the tracked files, the tests named beside it run there, and the mutant is *killed* when they fail.

    .venv/bin/python tests/mutants.py [NAME ...]      # all by default; not part of `make test`

Prints one line per mutant (killed / SURVIVED, the test run, seconds) and exits 1 if any survived.
A mutant whose text is not found in its file is an error: the code moved, update the mutant.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    path: str
    swaps: list[tuple[str, str]]  # (text in the file, what replaces it), applied in order
    tests: list[str]  # pytest arguments that must fail


def swap_kinds(text: str) -> str:
    return text.replace('"reverse_kl"', '"@@"').replace('"forward_kl"', '"reverse_kl"').replace('"@@"', '"forward_kl"')


MUTANTS = [
    Mutant("kl-swapped-in-kernels-and-reference", "kernels/divergence.py", [("__swap_kinds__", "")],
           ["tests/test_kernels.py", "-k", "trl"]),
    Mutant("token-weights-local-counts", "compaction/rl.py",
           [("return [1.0 / global_tokens] * len(lengths)", "return [1.0 / sum(lengths)] * len(lengths)"),
            ("return [1.0 / (max(n, 1) * global_seqs) for n in lengths]",
             "return [1.0 / (max(n, 1) * len(lengths)) for n in lengths]")],
           ["tests/test_rl.py"]),
    Mutant("k3-replaced-by-k1", "compaction/rl.py", [("k3 = torch.exp(d) - d - 1.0", "k3 = -d")],
           ["tests/test_rl.py"]),
    Mutant("k3-sign-of-d-flipped", "compaction/rl.py", [("d = ref_logp - logp", "d = logp - ref_logp")],
           ["tests/test_rl.py"]),
    Mutant("report-deltas-unpaired", "compaction/report/statistics.py",
           [("- ratio_of_sums(sb, cb, w_b, w_prob)", "- ratio_of_sums(sb, cb, w_b, resample_counts(rng, len(problems), b))")],
           ["tests/test_report_statistics.py"]),
    Mutant("promotion-accepts-non-finite-metrics", "compaction/promotion.py",
           [("not math.isfinite(float(v))", "False")], ["tests/test_promotion.py"]),
    Mutant("rowdot-sequential-bmm", "kernels/_chunking.py",
           [("    if vocab <= ROWDOT_BLOCK:\n", "    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)\n"
                                              "    if vocab <= ROWDOT_BLOCK:\n")],
           ["tests/test_kernels.py", "-k", "precise"]),
    Mutant("jsd-beta-ends-accepted", "compaction/params.py",
           [('if info.data.get("divergence") == "jsd" and beta in (0.0, 1.0):', "if False:")],
           ["tests/test_params.py", "-k", "jsd"]),
    Mutant("soft-timeout-reported-as-parse-error", "compaction/grading.py",
           [('        except self.TimeoutException:  # a BaseException subclass\n            return False, "timeout"',
             '        except self.TimeoutException:  # a BaseException subclass\n            return False, "parse_error"')],
           ["tests/test_grading.py", "-k", "soft_timeout"]),
    Mutant("rlvr-update-ignores-steps-per-round", "jobs/rlvr.py",
           [("        for _ in range(cfg.steps_per_round):", "        for _ in range(1):")],
           ["tests/test_rlvr.py", "-k", "every_aggregation"]),
    Mutant("opsd-clip-ignored", "kernels/divergence.py",
           [("            keep = value <= clip\n", "            keep = value <= float(\"inf\")\n")],
           ["tests/test_opsd.py", "-k", "live_teacher"]),
    Mutant("lenpen-penalises-wrong-answers-too", "compaction/rl.py",
           [("return -coef * np.asarray(correct, dtype=bool) * lengths / max_new_tokens",
             "return -coef * lengths / max_new_tokens")],
           ["tests/test_rl.py", "-k", "length_penalty"]),
    Mutant("study-deltas-not-paired-by-seed", "compaction/report/statistics.py",
           [("w_b = w_m if paired_seeds and", "w_b = w_m if False and")],
           ["tests/test_report_statistics.py", "-k", "paired_by_seed"]),
    Mutant("verdict-incorrect-on-point-estimate", "compaction/report/table.py",
           [('ok = i["accuracy_delta_ci"][1] < 0', 'ok = i["accuracy_delta"] < 0')],
           ["tests/test_report_statistics.py", "-k", "verdict"]),
    Mutant("corrupt-parquet-unnamed", "compaction/artifacts.py",
           [('raise ValueError(f"{path}: not a readable Parquet file', 'raise ValueError(f"not a readable Parquet file')],
           ["tests/test_cli.py", "-k", "corrupt"]),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def run(m: Mutant) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        root = Path(tmp)
        copy_tree(root)
        target = root / m.path
        text = target.read_text()
        for old, new in m.swaps:
            if old == "__swap_kinds__":
                new_text = swap_kinds(text)
            elif old in text:
                new_text = text.replace(old, new)
            else:
                raise SystemExit(f"mutant {m.name}: {old!r} is not in {m.path}; update the mutant")
            if new_text == text:
                raise SystemExit(f"mutant {m.name}: changed nothing in {m.path}")
            text = new_text
        target.write_text(text)
        t0 = time.perf_counter()
        env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
               "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                           cwd=root, env=env, capture_output=True, text=True)
        failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
        return r.returncode != 0, time.perf_counter() - t0, failed[0] if failed else r.stdout.strip()[-200:]


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    survived = 0
    for m in chosen:
        killed, seconds, detail = run(m)
        survived += not killed
        print(f"{'killed  ' if killed else 'SURVIVED'} {m.name:40s} {' '.join(m.tests):45s} {seconds:5.1f}s  {detail}",
              flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
