"""Stage sft: supervised fine-tuning on thinking traces, loss on response tokens only.

    python -m jobs.sft --params params/demo.yaml --base BASE_CKPT --traces TRACES --out OUT
    accelerate launch --config_file params/accelerate/cpu-2proc.yaml -m jobs.sft ...   # same code

Setup -> train -> save. Each optimizer step takes a global batch of `sft.batch_size`
sequences, split across processes and then into micro-batches (gradient accumulation); the
loss is the summed token NLL divided by the global count of response tokens, so one process
and N processes follow the same curve. Cosine schedule with warmup. Checkpoints every
`sft.save_every` steps and at the end; a restarted job resumes from the latest one at the
same data position (the order is a pure function of seed, epoch and the traces' lengths).
Batches are length-grouped (`sft.length_grouping`), so little of a step is padding. The
finished model is `<out>/final/` (HF `save_pretrained`).
"""

from __future__ import annotations

from contextlib import nullcontext
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from compaction.artifacts import read_parquet
from compaction.logs import get_logger
from compaction.model import build_prompt, build_student_messages, build_teacher_messages, load_model, load_tokenizer
from compaction.model.prompts import SOLUTION_CONTEXT
from compaction.params import Params
from compaction.scoring import TokenScorer
from compaction.training import (
    TRAINER_STATE, MetricsLog, cosine_with_warmup, latest_checkpoint, make_accelerator, micro_batches, pad_batch,
    publish_final, save_checkpoint, shard,
)
from jobs.common import params_from, parse, parser


def build_examples(tokenizer, traces, max_seq_len: int, enable_thinking: bool) -> list[tuple[list[int], int]]:
    """(token ids of prompt + response + end token, index of the first response token) per trace.

    A trace with a ``context`` (reference solution) is prompted exactly as the OPSD teacher is.
    """
    examples = []
    contexts = traces["context"] if "context" in traces.columns else [None] * len(traces)
    for problem, context, response in zip(traces["problem"], contexts, traces["response"]):
        messages = (build_student_messages(problem) if not isinstance(context, str)
                    else build_teacher_messages(problem, SOLUTION_CONTEXT.format(solution=context)))
        prompt = build_prompt(tokenizer, messages, enable_thinking)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p_ids + r_ids)[:max_seq_len]
        if len(ids) > len(p_ids):
            examples.append((ids, len(p_ids)))
    return examples


def epoch_order(n: int, seed: int, epoch: int, lengths: Sequence[int] = (), batch_size: int = 1,
                window: int = 0) -> list[int]:
    """Example indices of one epoch, shuffled by (seed, epoch).

    With ``lengths`` and ``window`` > 1 the order is length-grouped: each run of ``window``
    global batches is sorted by length, cut into batches, and the batches shuffled, so a batch
    pads to nearly its own length (fewer wasted tokens) while its position in the epoch stays
    random. The first ``(-epoch * n) % batch_size`` indices complete the batch that straddles
    the previous epoch, so later epochs' batches stay aligned with the sorted runs.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if not lengths or window <= 1 or n <= batch_size:
        return order
    lead = (-epoch * n) % batch_size
    out = order[:lead]
    for start in range(lead, n, window * batch_size):
        run = sorted(order[start: start + window * batch_size], key=lengths.__getitem__)
        batches = [run[i: i + batch_size] for i in range(0, len(run), batch_size)]
        # A short last batch (the epoch's end) stays last, or it would shift every later cut.
        full = len(batches) - (len(batches[-1]) < batch_size)
        out += [i for k in torch.randperm(full, generator=g).tolist() for i in batches[k]] + run[full * batch_size:]
    return out


def global_batch(n: int, seed: int, step: int, batch_size: int, lengths: Sequence[int] = (),
                 window: int = 0) -> list[int]:
    """Example indices of optimizer step ``step``: a pure function, so resume needs only the step."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        take = min(batch_size - len(out), n - offset)
        out += epoch_order(n, seed, epoch, lengths, batch_size, window)[offset: offset + take]
        pos += take
    return out


class SFTRecipe:
    def __init__(self, params: Params, base_ref: str, traces_path: str, out_dir: str | Path):
        self.p, self.cfg = params, params.sft
        self.base_ref, self.traces_path, self.out = base_ref, traces_path, Path(out_dir)
        self.log = get_logger()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.acc = make_accelerator()
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(self.base_ref, padding_side="right")
        traces = read_parquet(self.traces_path, required=["problem", "response"])
        self.examples = build_examples(self.tokenizer, traces, cfg.max_seq_len, self.p.model.enable_thinking)
        if not self.examples:
            raise ValueError(f"{self.traces_path}: no usable traces (empty, or all longer than sft.max_seq_len)")
        self.lengths = [len(ids) for ids, _ in self.examples]
        steps_per_epoch = math.ceil(len(self.examples) / cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        model = load_model(self.base_ref, dtype="float32", device=self.acc.device,
                           attn_implementation=self.p.model.attn_implementation)
        model.config.use_cache = False
        scorer = TokenScorer(model, backend=self.p.model.kernel_backend, uniform_token_weights=True)
        optimizer = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=(0.9, 0.95))
        self.scorer, self.optimizer = self.acc.prepare(scorer, optimizer)
        # Stepped by hand once per optimizer step (accelerate's wrapper steps it once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(self.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
        self.acc.register_for_checkpointing(self.scheduler)
        self.step = 0
        ckpt = latest_checkpoint(self.out)
        if ckpt is not None:
            self.acc.load_state(str(ckpt / "state"))
            self.step = json.loads((ckpt / TRAINER_STATE).read_text())["step"]
            self.log.info("sft: resumed from %s (step %d of %d)", ckpt, self.step, self.total_steps)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.acc.is_main_process, self.step)

    # ------------------------------------------------------------------ train
    def train_step(self) -> dict[str, float]:
        acc, cfg = self.acc, self.cfg
        batch = shard(global_batch(len(self.examples), cfg.seed, self.step, cfg.batch_size, self.lengths,
                                   cfg.length_grouping), acc.process_index, acc.num_processes)
        local_tokens = sum(len(self.examples[i][0]) - self.examples[i][1] for i in batch)
        global_tokens = acc.reduce(torch.tensor(float(local_tokens), device=acc.device), "sum").item()
        # DDP averages gradients over processes; scale so the result is sum(NLL) / global tokens.
        scale = acc.num_processes / global_tokens
        nll_sum = 0.0
        micro = micro_batches(batch, cfg.micro_batch_size)
        for k, mb in enumerate(micro):
            seqs = [self.examples[i][0] for i in mb]
            starts = [self.examples[i][1] for i in mb]
            b = {key: t.to(acc.device) for key, t in pad_batch(seqs, starts, self.tokenizer.pad_token_id).items()}
            sync = k == len(micro) - 1
            ctx = acc.no_sync(self.scorer) if not sync else nullcontext()
            with ctx:
                logp = self.scorer(b["input_ids"], b["attention_mask"], b["score_mask"])
                loss = -logp.sum() * scale
                acc.backward(loss)
            nll_sum += -logp.detach().sum().item()
        grad_norm = acc.clip_grad_norm_(self.scorer.parameters(), cfg.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = acc.reduce(torch.tensor(nll_sum, device=acc.device), "sum").item() / global_tokens
        return {"sft/loss": loss_total, "sft/lr": lr, "sft/grad_norm": float(grad_norm),
                "sft/tokens": global_tokens}

    def train(self) -> None:
        bar = tqdm(total=self.total_steps, initial=self.step, desc="sft", unit="step",
                   disable=not self.acc.is_main_process)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            m = self.train_step()
            self.step += 1
            m["sft/tokens_per_s"] = m.pop("sft/tokens") / (time.perf_counter() - t0)
            self.metrics.log(self.step, m)
            bar.set_postfix(loss=f"{m['sft/loss']:.3f}")
            bar.update(1)
            if self.step % self.cfg.save_every == 0 or self.step == self.total_steps:
                save_checkpoint(self.acc, self.scorer, self.tokenizer, self.out,
                                {"step": self.step, "samples_seen": self.step * self.cfg.batch_size})
        bar.close()

    # ------------------------------------------------------------------- save
    def save(self) -> Path:
        final = publish_final(self.acc, self.scorer, self.tokenizer, self.out)
        self.log.info("sft: %d steps -> %s", self.step, final)
        return final



def run(params: Params, base_ref: str, traces_path: str, out_dir: str | Path) -> str:
    out = Path(out_dir)
    if (out / "final" / "config.json").is_file():
        return str(out / "final")  # already complete
    recipe = SFTRecipe(params, base_ref, traces_path, out)
    recipe.setup()
    recipe.train()
    return str(recipe.save())


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base model: local checkpoint or hub id")
    p.add_argument("--traces", required=True, help="traces Parquet (problem, response)")
    p.add_argument("--out", required=True, help="stage folder (checkpoints/, final/, metrics.jsonl)")
    args = parse(argv, p)
    return run(params_from(args), args.base, args.traces, args.out)


if __name__ == "__main__":
    main()
