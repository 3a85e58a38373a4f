"""Redundancy maps: where in a response the teacher (who knows the solution) disagrees with the
student, token by token.

Each OPSD round scores a fixed, seeded choice of round 0's rollouts with that round's student and
teacher and saves ``redundancy_map.parquet`` (rollout_id, position, token, divergence, plus
problem_id, correct, token_id). Tokens the teacher finds unlikely ("wait", re-checks, restated
steps) carry large divergence: that is what OPSD removes. :func:`write_html` renders a map as
one HTML page, each token shaded by its divergence:

    compaction redundancy-map artifacts/opsd/<key>/round-0003 --out map.html

Model outputs are untrusted text: every token is HTML-escaped, and the page has no script.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from compaction.artifacts import atomic_path, read_parquet

MAP_FILE = "redundancy_map.parquet"
MAP_COLUMNS = ("rollout_id", "position", "token", "divergence")


def choose_rollouts(rollouts: pd.DataFrame, grades: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded choice of ``n`` rollouts with a non-empty response (in their order), with ``correct``."""
    verdict = grades.set_index("rollout_id")["correct"]
    df = rollouts.assign(correct=verdict.loc[rollouts["rollout_id"]].to_numpy().astype(bool))
    df = df[df["response_token_ids"].map(len) > 0].reset_index(drop=True)
    k = min(n, len(df))
    idx = np.sort(np.random.default_rng([seed, 0x3A9]).choice(len(df), size=k, replace=False))
    return df.iloc[idx].reset_index(drop=True)


def map_frame(sample: pd.DataFrame, values: list[np.ndarray], tokenizer) -> pd.DataFrame:
    """One row per response token of each sampled rollout: its text, id and divergence."""
    rows = []
    for (_, r), v in zip(sample.iterrows(), values):
        ids = [int(t) for t in r["response_token_ids"]]
        assert len(ids) == len(v), (r["rollout_id"], len(ids), len(v))
        for pos, (tid, d) in enumerate(zip(ids, v)):
            rows.append({"rollout_id": r["rollout_id"], "position": pos,
                         "token": tokenizer.decode([tid], skip_special_tokens=False), "divergence": float(d),
                         "token_id": tid, "problem_id": r["problem_id"], "correct": bool(r["correct"])})
    return pd.DataFrame(rows, columns=[*MAP_COLUMNS, "token_id", "problem_id", "correct"])


# --------------------------------------------------------------------------- HTML
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 64em; margin: 2em auto; padding: 0 1em; color: #222; }
.legend { display: flex; align-items: center; gap: .5em; margin: 1em 0; }
.bar { width: 16em; height: 1em; border: 1px solid #aaa;
       background: linear-gradient(to right, rgba(214,39,40,0), rgba(214,39,40,1)); }
.rollout { border: 1px solid #ddd; border-radius: 4px; padding: .5em 1em; margin: 1em 0; }
.rollout h2 { font-size: 1em; margin: .3em 0; }
.correct { color: #2a7d2a; } .incorrect { color: #b22; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-word; line-height: 1.6; }
.text span { border-radius: 2px; }
"""


def _shade(value: float, scale: float) -> float:
    return float(np.clip(value / scale, 0.0, 1.0)) if scale > 0 and np.isfinite(value) else 0.0


def render_html(df: pd.DataFrame, title: str = "Redundancy map") -> str:
    """The page: a legend, then one block per rollout (verdict, mean divergence) with its tokens
    shaded by divergence (full colour at the 99th percentile of the page; hover for the value)."""
    missing = [c for c in MAP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"redundancy map: missing column(s) {missing}")
    values = df["divergence"].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    scale = float(np.percentile(finite, 99)) if finite.size else 0.0
    esc = html.escape
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p>Each response token is shaded by the divergence between the teacher (who sees the privileged "
        "context) and the student at that position. Dark tokens are the ones the teacher would not have "
        "written: candidates for compaction. Hover over a token for its value.</p>",
        f'<div class="legend"><span>0</span><span class="bar"></span><span>&ge; {scale:.3g}</span>'
        f"<span>({len(df)} tokens, mean {np.mean(finite) if finite.size else float('nan'):.3g})</span></div>",
    ]
    for rid, g in df.groupby("rollout_id", sort=False):  # rollouts in the file's order
        g = g.sort_values("position", kind="stable")
        verdict = ""
        if "correct" in g.columns:
            word = "correct" if bool(g["correct"].iloc[0]) else "incorrect"
            verdict = f' &middot; <span class="{word}">{word}</span>'
        mean = float(np.nanmean(g["divergence"].to_numpy(dtype=float))) if len(g) else float("nan")
        parts.append(f'<div class="rollout"><h2>rollout {esc(str(rid))}{verdict} &middot; {len(g)} tokens '
                     f"&middot; mean divergence {mean:.3g}</h2><div class=\"text\">")
        for token, d in zip(g["token"], g["divergence"].to_numpy(dtype=float)):
            alpha = _shade(d, scale)
            parts.append(f'<span style="background:rgba(214,39,40,{alpha:.3f})" title="{d:.4g}">'
                         f"{esc(str(token))}</span>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def map_path(src: str | Path) -> Path:
    """The map Parquet of a round folder, or ``src`` itself when it is a file."""
    src = Path(src)
    return src / MAP_FILE if src.is_dir() else src


def write_html(src: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Render the map of a round folder (or a map Parquet file) to ``out``, atomically."""
    path = map_path(src)
    df = read_parquet(path, required=MAP_COLUMNS)
    title = title or f"Redundancy map: {path.parent.name if path.name == MAP_FILE else path.stem}"
    with atomic_path(out) as tmp:
        tmp.write_text(render_html(df, title), encoding="utf-8")
    return Path(out)
