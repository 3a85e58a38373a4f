"""What the round-based stages (RLVR, OPSD) share: round folders, each round's problems, and
on-policy generation that does not depend on the process layout.

A round is a pure function of (previous round's folder, round index, params): it lives in
``<out>/round-XXXX/`` and a restart begins at the first round without ``metrics.json``.

Generation: the round's prompts are cut into fixed chunks, each sampled with its own seed
(:func:`chunk_seed`), and chunks are dealt to processes round-robin. So 1 and N processes
draw exactly the same rollouts, and a global loss normalisation then gives the same step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from compaction.data import ROLLOUT_COLUMNS
from compaction.rollout import HFEngine, Sampling, generate_rollouts

#: The file whose presence marks a completed round (written last, inside the atomic folder).
ROUND_DONE = "metrics.json"


def round_dir(out: Path, round_: int) -> Path:
    return Path(out) / f"round-{round_:04d}"


def round_completed(out: Path, round_: int) -> bool:
    return (round_dir(out, round_) / ROUND_DONE).is_file()


def model_ref_of(ref: str) -> str:
    """The HF checkpoint behind ``ref``: a round folder's ``model/``, or ``ref`` itself."""
    return str(Path(ref) / "model") if (Path(ref) / "model").is_dir() else ref


def round_problems(train: pd.DataFrame, round_: int, per_round: int, seed: int) -> pd.DataFrame:
    """The round's prompts: walk a seeded permutation of the train split, epoch after epoch."""
    n = len(train)
    idx = []
    pos = round_ * per_round
    while len(idx) < per_round:
        epoch, off = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(per_round - len(idx), n - off)
        idx += perm[off: off + take].tolist()
        pos += take
    return train.iloc[idx].reset_index(drop=True)


def chunk_seed(seed: int, round_: int, chunk: int) -> int:
    return int(hashlib.sha256(f"{seed}:{round_}:{chunk}".encode()).hexdigest()[:8], 16)


def generate_round_rollouts(acc, model, tokenizer, problems: pd.DataFrame, *, samples_per_prompt: int,
                            temperature: float, max_new_tokens: int, seed: int, round_: int, policy_ref: str,
                            enable_thinking: bool, batch_size: int, desc: str, decoder: str = "auto") -> pd.DataFrame:
    """This process's share of the round's rollouts (with ``response_token_ids``).

    ``group`` = the prompt's position in the round (a problem may appear twice when the order
    wraps): the unit of group statistics. ``batch_size`` sequences per generate call; ``decoder``
    as ``rollout.hf_decoder``.
    """
    n = samples_per_prompt
    per_chunk = max(1, batch_size // n)
    chunks = [list(range(i, min(i + per_chunk, len(problems)))) for i in range(0, len(problems), per_chunk)]
    mine = [c for c in range(len(chunks)) if c % acc.num_processes == acc.process_index]
    was_training = model.training
    engine = HFEngine(model.eval(), tokenizer, batch_size=per_chunk * n, decoder=decoder)
    frames = []
    for c in tqdm(mine, desc=desc, disable=not acc.is_main_process):
        sampling = Sampling(n=n, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                            seed=chunk_seed(seed, round_, c))
        df = generate_rollouts(engine, tokenizer, problems.iloc[chunks[c]], sampling, policy_ref, round_,
                               enable_thinking, token_ids=True)
        frames.append(df.assign(group=np.repeat(chunks[c], n)))
    model.train(was_training)
    if not frames:  # more processes than generation chunks: this one samples nothing
        return pd.DataFrame(columns=[*ROLLOUT_COLUMNS, "response_token_ids", "group"])
    return pd.concat(frames, ignore_index=True)


def gather_frames(*frames: pd.DataFrame) -> list[pd.DataFrame]:
    """Every process's rows of each frame, concatenated (on every process: a collective)."""
    from accelerate.utils import gather_object

    return [pd.concat(gather_object([f]), ignore_index=True) for f in frames]
