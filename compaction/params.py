"""One parameter schema for every stage, loaded from ``params/*.yaml``.

Each section is a pydantic model whose fields are documented where they are defined
(TRL style). Unknown keys and wrong types are errors that name the key and the file,
raised by :func:`load_params` before any work starts. ``--set a.b=c`` overrides are
parsed as YAML scalars (``--set sft.lr=3e-4``, ``--set opsd.conditions=[correct]``).

Relative paths (``paths.root``, ``paths.artifacts``, tracking store) are resolved to
absolute ones at load time, because Prefect workers and accelerate processes change
directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

# The choice sets that other modules also spell are defined once, outside this file (both import no
# pandas or torch): OPSD conditions and units (compaction.enums, re-exported by compaction.selection),
# divergence kinds and kernel backends (kernels._kinds, exported by kernels).
from compaction.enums import BRANCHES, Branch, Unit
from kernels import Backend, Kind


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------- data
class SyntheticDomain(Section):
    """The embedded, seeded math domain (see ``compaction/data/synthetic.py``)."""

    seed: int = Field(0, description="Seed of the generator; the same seed gives the same problems.")
    n_train: int = Field(2000, ge=1, description="Training problems (SFT traces, RLVR and OPSD prompts).")
    n_eval: int = Field(200, ge=1, description="Held-out evaluation problems (never share a problem with train).")
    families: list[str] = Field(
        default_factory=lambda: ["arithmetic", "linear_equation", "modular", "fraction_sum", "gcd_lcm", "sequence_sum"],
        description="Problem families to draw from (names in compaction.data.synthetic.FAMILIES).",
    )
    difficulty: tuple[int, int] = Field((1, 3), description="Inclusive range of the difficulty knob (1 = easiest).")
    redundancy_rate: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Per-step probability of a redundant move in SFT traces (re-check, restated step, "
        "'wait'/'hmm' hesitation, detour that comes back).",
    )
    traces_per_problem: int = Field(1, ge=1, description="SFT traces sampled per training problem.")
    slip_rate: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Fraction of SFT traces that end in an uncaught slip (a wrong last step and a wrong "
        "boxed answer), as in teacher-distilled SFT data that no verifier filtered. SFT learns to slip "
        "at about this rate; RLVR's verifiable reward is what removes it (docs/tuning.md).",
    )
    direct_answer_rate: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Fraction of SFT traces that give the (right) answer with an empty thinking block, "
        "like the no-thinking examples in a hybrid model's SFT mix. SFT learns to skip the working at "
        "about this rate, which is wrong on most multi-step problems; RLVR's reward is what teaches "
        "the model to work them out (docs/tuning.md).",
    )
    premature_answer_rate: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Fraction of SFT traces that stop one step early and box that step's value (a "
        "wrong answer: the last operation forgotten), as in SFT data distilled from a teacher that "
        "sometimes quits too soon. SFT learns to stop early at about this rate; RLVR's reward is what "
        "removes it (docs/tuning.md).",
    )
    privileged_fraction: float = Field(
        0.25, ge=0.0, le=1.0,
        description="Fraction of training problems that get one more SFT example whose prompt also shows "
        "the reference solution (the OPSD teacher's prompt) and whose trace follows it without "
        "redundant moves: the in-context use of a solution that a real base model brings from "
        "pre-training, and that a model trained from scratch must be shown (docs/decisions.md).",
    )


class DatasetSpec(Section):
    """A real problem set, by hub id or local jsonl/parquet file, mapped to the problems schema."""

    name: str = Field(..., description="Short name used in metric names (eval/<name>/accuracy).")
    path: str = Field(..., description="Hub id (e.g. HuggingFaceH4/MATH-500) or local .jsonl/.json/.parquet file.")
    preset: Literal["gsm8k", "math500", "aime", "custom"] = Field(
        "custom", description="Column conventions of a known set; `custom` uses the column fields below."
    )
    config: str | None = Field(None, description="Dataset config name on the hub (e.g. 'main' for gsm8k).")
    split: str = Field("test", description="Split to load from the hub (local files have one split).")
    problem_column: str = Field("problem", description="Column holding the problem text.")
    answer_column: str = Field("answer", description="Column holding the final answer.")
    solution_column: str | None = Field("solution", description="Column holding a reference solution, if any.")
    limit: int | None = Field(None, ge=1, description="Keep only the first `limit` rows (after loading).")


class DataParams(Section):
    """Where the problems come from (the data stage writes them to one problems Parquet)."""

    source: Literal["synthetic", "dataset"] = Field(
        "synthetic", description="`synthetic` = the embedded domain; `dataset` = train on `train_set`."
    )
    synthetic: SyntheticDomain = Field(
        default_factory=SyntheticDomain, description="The embedded domain's generator (used when source = synthetic).")
    train_set: DatasetSpec | None = Field(None, description="Training problems when source = dataset.")
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Fraction of a real train_set's problems held out as the eval split (source = "
        "dataset), chosen by a hash of problem_id: stable, and no problem lands in both splits.")

    @model_validator(mode="after")
    def _dataset_needs_train_set(self) -> "DataParams":
        if self.source == "dataset" and self.train_set is None:
            raise ValueError("data.train_set is required when data.source is 'dataset'")
        return self


# -------------------------------------------------------------------------- model
class TinyModel(Section):
    """Size of the embedded random-initialised Qwen3 model and its locally trained tokenizer."""

    vocab_size: int = Field(512, ge=64, description="Target BPE vocabulary size (special tokens included).")
    hidden_size: int = Field(128, ge=8, description="Width of the residual stream (Qwen3Config.hidden_size).")
    intermediate_size: int = Field(
        384, ge=8, description="Inner width of each SwiGLU MLP block (Qwen3Config.intermediate_size).")
    num_hidden_layers: int = Field(4, ge=1, description="Transformer decoder layers.")
    num_attention_heads: int = Field(4, ge=1, description="Query heads per attention layer.")
    num_key_value_heads: int = Field(
        2, ge=1, description="Key/value heads per attention layer (grouped-query attention; must divide "
        "num_attention_heads).")
    head_dim: int = Field(32, ge=4, description="Width of each attention head (Qwen3 sets it apart from hidden_size).")
    max_position_embeddings: int = Field(
        1024, ge=64, description="Longest sequence (prompt + response) the model is configured for, in tokens (RoPE).")
    tie_word_embeddings: bool = Field(True, description="Qwen3 small models tie the LM head to the embeddings.")
    seed: int = Field(0, description="Seed of the random initialisation.")


class ModelParams(Section):
    """The base model every stage starts from, and how it is loaded and scored."""

    name_or_path: str = Field(
        "embedded", description="`embedded` builds the tiny model; otherwise a hub id or a local HF checkpoint."
    )
    tokenizer: str | None = Field(None, description="Tokenizer path/id if different from the model's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype of the generation engines: the hf engine of evaluation and rollout "
        "grading, and the vLLM server of every stage; training keeps float32 weights. `auto`: float32 on CPU, "
        "bfloat16 on GPU."
    )
    enable_thinking: bool = Field(True, description="Pass enable_thinking to the chat template where it has one.")
    attn_implementation: str | None = Field(None, description="e.g. 'sdpa', 'flash_attention_2'; None = HF default.")
    kernel_backend: Backend = Field(
        "auto", description="Log-prob / divergence kernels (kernels.BACKENDS) for every training stage: `triton` "
        "(fused, CUDA), `torch` (chunked over tokens, any device), `eager` (full logits: the reference), "
        "`auto` = triton on CUDA, torch elsewhere."
    )
    tiny: TinyModel = Field(
        default_factory=TinyModel, description="Size of the embedded model (used when name_or_path = embedded).")


# ------------------------------------------------------------------------ rollout
class RolloutParams(Section):
    """The generation engine. Evaluation, rollout grading, RLVR and OPSD take the engine settings from
    here and their own sampling settings (eval.*, opsd.*, rlvr.*); ``n``, ``temperature``, ``top_p``,
    ``top_k``, ``max_new_tokens`` and ``seed`` are the defaults of the standalone rollouts job
    (``python -m jobs.rollouts``), which those stages override."""

    backend: Literal["hf", "vllm"] = Field(
        "hf", description="`hf` = the policy's own weights in this process (transformers generate or the lean "
        "decoder); `vllm` = a vLLM server from its own environment (`make vllm`), weights reloaded every round.")
    n: int = Field(4, ge=1, description="Samples per prompt (rollouts job; evaluation uses eval.k, rollout grading "
                   "opsd.group_samples).")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of the rollouts job; 0 = greedy.")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens whose probability "
        "mass reaches this fraction (rollouts job; 1 = off).")
    top_k: int = Field(
        0, ge=0, description="Keep only the k most likely tokens when sampling (rollouts job); 0 = disabled.")
    max_new_tokens: int = Field(256, ge=1, description="Longest response of the rollouts job, in tokens; longer ones "
                                "are truncated (finish_reason `length`).")
    batch_size: int = Field(32, ge=1, description="Sequences per generate call (hf backend), in every stage that "
                            "generates (evaluation, rollout grading, RLVR and OPSD rounds).")
    hf_decoder: Literal["auto", "generate", "lean"] = Field(
        "auto", description="hf backend's decode loop: `generate` (transformers), `lean` (compaction.rollout.lean: "
        "plain Qwen3 loop, faster on CPU for small models: docs/performance.md), `auto` = lean for a plain Qwen3 on CPU. "
        "Also used for RLVR / OPSD rollouts.")
    seed: int = Field(0, description="Sampling seed of the rollouts job, and the vLLM server's --seed (every "
                      "stage). Evaluation, rollout grading, RLVR and OPSD sample with their own seeds.")
    vllm_url: str | None = Field(
        None, description="A vLLM server that is already running (e.g. on GPUs of its own), as http://HOST:PORT, "
        "started with VLLM_SERVER_DEV_MODE=1; None = each job starts its own. Weight reloads pass it a folder "
        "path: that folder must be on a filesystem both sides see.")
    vllm_weights_dir: str | None = Field(
        None, description="Where a stage job writes the policy's weights (safetensors, HF names) every round "
        "for the vLLM server to reload, in a subfolder per stage; None = <stage>/vllm/weights. A tmpfs such as "
        "/dev/shm skips the disk (~16 GB a round at 8B in bf16); with vllm_url the server must see the folder.")
    vllm_gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Share of each GPU's memory the vLLM server may take (weights + KV cache); "
        "lower it when the server shares GPUs with training.")
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="GPUs the vLLM server shards the model over.")
    vllm_max_model_len: int | None = Field(
        None, ge=16, description="The vLLM server's context length (prompt + response); None = the model's own.")
    vllm_cpu_kv_cache_gib: int = Field(
        1, ge=1, description="KV cache of a vLLM server on CPU, GiB (VLLM_CPU_KVCACHE_SPACE; vLLM's default "
        "takes most of the machine's memory and minutes to allocate).")
    vllm_startup_timeout_s: float = Field(
        600, gt=0, description="Seconds a started vLLM server has to answer /health; then the job fails, "
        "quoting the server's log.")


class GradingParams(Section):
    """The math-verify grader (compaction/grading.py): a pool of worker processes, shared by a job's rounds."""

    workers: int = Field(2, ge=1, description="math-verify worker processes.")
    timeout_s: float = Field(
        5.0, gt=0, description="Hard per-row deadline, in seconds; a hung worker is killed and replaced, and the "
        "row is graded incorrect (status timeout).")


# ---------------------------------------------------------------------------- SFT
class SFTParams(Section):
    """Stage sft (jobs/sft.py): supervised fine-tuning on the traces, AdamW with a cosine schedule."""

    lr: float = Field(3e-3, gt=0, description="Peak learning rate of AdamW (betas 0.9, 0.95), after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor as a fraction of lr.")
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Fraction of the optimizer steps with a linear warmup from 0 to lr; 0 = none.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    epochs: float = Field(3.0, gt=0, description="Passes over the traces (fractional allowed).")
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps (overrides epochs).")
    batch_size: int = Field(32, ge=1, description="Global batch in sequences per optimizer step.")
    micro_batch_size: int = Field(32, ge=1, description="Sequences per forward pass; accumulation = batch/micro.")
    max_seq_len: int = Field(
        512, ge=16, description="Longest training sequence (prompt + response + end token), in tokens: longer ones are "
        "cut; a trace with no response token left is dropped.")
    length_grouping: int = Field(
        16, ge=0, description="Sort the traces by length within runs of this many global batches and shuffle the "
        "batches of each run: a batch then pads to nearly its own length (~20% fewer tokens per step on the "
        "demo). 0 or 1 = plain random batches.")
    grad_clip: float = Field(1.0, gt=0, description="Largest global gradient norm (L2, clipped before each step).")
    save_every: int = Field(100, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    seed: int = Field(0, description="Seed of the torch RNG and of the batch order (shuffle and length grouping).")


# --------------------------------------------------------------------------- held-out curve
class HeldoutEvalFields(Section):
    """A round-based stage's evaluation along its rounds: every ``eval_every`` rounds (and before
    the first), the policy in the job samples ``eval_samples`` answers to each of the first
    ``eval_problems`` problems of the eval split (a fixed subset), at ``eval.temperature`` with
    ``eval.seed`` (the same seeds every time, so two points differ by the policy only), graded by
    math-verify. Logged as ``<stage>/heldout_accuracy`` and ``<stage>/heldout_mean_response_tokens``,
    step = rounds done (0 = the starting policy)."""

    eval_every: int = Field(0, ge=0, description="Evaluate on the held-out subset every N rounds, before the first "
                            "and after the last; 0 = off.")
    eval_problems: int = Field(64, ge=1, description="Problems of the held-out subset: the first N of the eval split.")
    eval_samples: int = Field(4, ge=1, description="Samples per held-out problem (avg@n accuracy).")


# --------------------------------------------------------------------------- RLVR
class RLVRParams(HeldoutEvalFields):
    """Stage rlvr (jobs/rlvr.py): GRPO-family RL with verifiable rewards (reward 1 correct / 0 not, from
    math-verify), with DAPO's clip-higher, token-mean loss, dynamic sampling and overlong treatment as
    options. AdamW (betas 0.9, 0.99, no weight decay) at a constant lr; gradient norm clipped at 1."""

    rounds: int = Field(10, ge=0, description="Rounds of rollouts -> grade -> update; 0 = skip RLVR (the SFT "
                        "checkpoint is the RLVR checkpoint).")
    prompts_per_round: int = Field(
        32, ge=1, description="Training problems per round (a seeded walk over the train split, epoch after epoch).")
    samples_per_prompt: int = Field(
        8, ge=2, description="Group size: rollouts per prompt, whose rewards give the group-normalised advantages "
        "(GRPO).")
    steps_per_round: int = Field(1, ge=1, description="Passes (PPO epochs) over the round's batch.")
    mini_batches: int = Field(
        1, ge=1, description="Optimizer steps per pass: the kept groups are split by group index into this "
        "many mini-batches (PPO mini-batches), so a round's rollouts give several steps at the cost of one "
        "extra forward pass for the behaviour log-probs. 1 with steps_per_round 1 = fully on-policy.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward pass (gradient accumulation).")
    lr: float = Field(1e-4, gt=0, description="Learning rate of AdamW (constant, no schedule).")
    eps_low: float = Field(
        0.2, ge=0, description="Lower clip range of the PPO-clip surrogate: the importance ratio is clipped below at "
        "1 - eps_low (PPO, GRPO).")
    eps_high: float = Field(
        0.28, ge=0, description="Upper clip range: the ratio is clipped above at 1 + eps_high. Larger than eps_low = "
        "DAPO's clip-higher, which leaves low-probability tokens room to grow (against entropy collapse).")
    loss_agg: Literal["token_mean", "seq_mean", "const_norm"] = Field(
        "token_mean", description="How per-token losses are averaged over the global batch: token_mean (DAPO) = over "
        "every response token; seq_mean (GRPO) = over each sequence's tokens, then over sequences; const_norm "
        "(Dr. GRPO) = sum over tokens divided by sequences x max_new_tokens (no length bias)."
    )
    adv_scaling: Literal["group", "batch", "none"] = Field(
        "group", description="What the group-centred advantages (reward minus group mean) are divided by: `group` = "
        "the group's reward std (GRPO), `batch` = the std of every reward of the round, `none` = nothing "
        "(Dr. GRPO, which drops the std normalisation as a difficulty bias).")
    negative_weight: float = Field(
        1.0, ge=0, le=1, description="Factor on negative advantages. 1 = GRPO/DAPO as usual; 0 = reinforce only "
        "the better-than-average samples of each group (positive sample reinforcement: a RAFT-like update, "
        "which pushes no probability mass away from sampled tokens and so tolerates a higher lr).")
    kl_coef: float = Field(
        0.0, ge=0, description="Weight of the per-token KL penalty to the frozen reference (the policy RLVR starts "
        "from, i.e. the SFT checkpoint), estimated with Schulman's k3 estimator exp(ref - logp) - (ref - logp) - 1; "
        "0 = off (no reference model is loaded).")
    dynamic_sampling: bool = Field(
        True, description="Drop groups whose rewards all agree (zero advantage, no learning signal): DAPO's dynamic "
        "sampling filter, without DAPO's extra sampling to refill the batch.")
    overlong: Literal["mask", "penalty", "none"] = Field(
        "mask", description="Treatment of truncated responses (hit max_new_tokens): `mask` = left out of the loss "
        "(DAPO's overlong filtering: no verdict on an unfinished answer); `penalty` = DAPO's soft overlong "
        "punishment added to the reward (see overlong_buffer); `none` = trained like the others.")
    overlong_buffer: int = Field(
        32, ge=0, description="Length of DAPO's soft overlong punishment ramp, in tokens (overlong = penalty): 0 up "
        "to max_new_tokens - overlong_buffer, then linearly down to -1 at max_new_tokens; 0 = no penalty.")
    length_penalty: float = Field(
        0.0, ge=0, le=1, description="Coefficient a of a penalty linear in response length, on correct responses "
        "only: reward = 1 - a * L / max_new_tokens for a correct response of L tokens, 0 for a wrong one "
        "(compaction.rl.length_penalty; the simplest member of the correct-only length rewards of Kimi k1.5, "
        "arXiv:2501.12599, and Arora & Zanette, arXiv:2502.04463). 0 = off (RLVR); the length-penalty "
        "baseline sets it from `lenpen.coefficient`.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature of the round's rollouts, also applied to the log-probs of the "
        "loss (so the ratio compares the distributions that were sampled).")
    max_new_tokens: int = Field(
        256, ge=1, description="Longest rollout response, in tokens (truncated beyond); also the constant of "
        "const_norm and the end of the overlong ramp.")
    save_every: int = Field(
        10, ge=1, description="Write a resumable checkpoint (weights, optimizer, RNG, round index) every N "
        "rounds and after the last; does not change the result, so not part of the cache key.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept; older ones are deleted.")
    seed: int = Field(0, description="Seed of the rounds' prompt order and of the rollouts' sampling.")


# --------------------------------------------------------------------------- OPSD
class OPSDParams(HeldoutEvalFields):
    """Stage opsd (jobs/opsd.py): on-policy self-distillation (OPSD; "On-Policy Self-Distillation"). The
    student samples its own responses; a teacher, the same model prompted with a privileged context
    (reference solution or final answer), scores them; the loss is a per-token divergence between
    the two next-token distributions, averaged over the selected response tokens (gradient through
    the student only). One OPSD run per condition. AdamW (betas 0.9, 0.99, no weight decay) at a
    constant lr; gradient norm clipped at 1."""

    conditions: list[Branch] = Field(
        default_factory=lambda: list(BRANCHES),
        description="The compaction flow's branches (compaction.enums.BRANCHES). OPSD conditions, one OPSD run "
        "each: which rollouts enter the loss, `all`, the verifier's `correct` or `incorrect` ones (see unit); "
        "`baseline` = no training (the RLVR checkpoint). And `lenpen`: the length-penalty baseline (section "
        "lenpen), RLVR continued from the checkpoint.",
    )
    unit: Unit = Field(
        "pool", description="What the condition selects. `pool` (the design card's DAG): prompts, once, before "
        "OPSD: the checkpoint is sampled `group_samples` times per prompt (rollout grading), and `correct` keeps "
        "the prompts whose pass rate is >= `group_threshold`, `incorrect` those below it, `all` every prompt "
        "(group filtering); every on-policy rollout of a pool prompt then enters the loss. `rollout`: each "
        "round's rollouts by their own verdict; `group`: each round's groups by their pass rate (both over "
        "every prompt).")
    group_threshold: float = Field(
        0.5, ge=0, le=1, description="Pass rate (a fraction of samples graded correct) a prompt (unit = pool) or a "
        "round's group (unit = group) needs to count as correct.")
    group_samples: int = Field(
        4, ge=1, description="Samples per prompt of the checkpoint in rollout grading (unit = pool): the pass "
        "rate that group filtering reads.")
    pool_prompts: int | None = Field(
        512, ge=1, description="Training prompts that rollout grading samples (a seeded choice; None = the whole "
        "train split): the candidates of every condition's pool.")
    teacher: Literal["frozen", "live", "ema"] = Field(
        "frozen", description="Teacher weights: `frozen` = the policy OPSD starts from (the RLVR checkpoint; with "
        "LoRA, the base without the adapter), `live` = the current student (no gradient), `ema` = an exponential "
        "moving average of the student (see ema_decay).")
    ema_decay: float = Field(
        0.99, gt=0, lt=1, description="EMA teacher (teacher = ema): after every optimizer step, teacher <- decay * "
        "teacher + (1 - decay) * student.")
    context: Literal["solution", "answer", "template"] = Field(
        "solution", description="Privileged context the teacher's prompt adds to the problem: the reference "
        "`solution`, the final `answer` only, or `template` (context_template).")
    context_template: str | None = Field(
        None, description="User template with {problem}, {solution}, {answer} (context = template)."
    )
    missing_solution: Literal["error", "answer"] = Field(
        "answer", description="What to do for problems without a reference solution when the context uses one "
        "(context = solution, or a template with {solution}): `error` = fail before any work, naming them; "
        "`answer` = give those problems the final answer as context instead."
    )
    divergence: Kind = Field(
        "reverse_kl", description="Per-token divergence between the student's (p) and the teacher's (q) full "
        "next-token distributions (kernels.KINDS, kernels/divergence.py): `reverse_kl` = KL(p || q), the OPSD "
        "default; `forward_kl` = KL(q || p); `jsd` = GKD's generalised Jensen-Shannon with weight beta (TRL's "
        "convention); `sampled_token` = a policy-gradient loss on the sampled token only, with advantage "
        "log q(y) - log p(y).")
    beta: float = Field(
        0.5, ge=0, le=1, description="JSD weight (divergence = jsd): beta * KL(q || M) + (1 - beta) * KL(p || M) with "
        "M = beta q + (1 - beta) p; 0 and 1 are refused (identically 0). Unused by the other divergences.")
    clip: float | None = Field(
        None, gt=0, description="Upper bound on each token's divergence value (nats); a clipped token gets no "
        "gradient. None = off.")
    temperature: float = Field(1.0, gt=0, description="Temperature of both distributions in the loss.")
    rounds: int = Field(10, ge=0, description="Rounds of rollouts -> grade -> select -> update per condition; 0 = "
                        "no training (every condition returns the RLVR checkpoint).")
    prompts_per_round: int = Field(
        32, ge=1, description="Prompts per round (a seeded walk over the train split, or over the condition's pool "
        "when unit = pool).")
    samples_per_prompt: int = Field(
        4, ge=1, description="On-policy student samples per prompt per round (a round's group, for unit = group).")
    steps_per_round: int = Field(
        1, ge=1, description="Optimizer steps per round, each over every selected rollout of the round.")
    micro_batch_size: int = Field(
        16, ge=1, description="Rollouts (student/teacher sequence pairs) per forward/backward pass (gradient "
        "accumulation); also the batch of the redundancy map's scoring.")
    lr: float = Field(1e-4, gt=0, description="Learning rate of AdamW (constant, no schedule).")
    sample_temperature: float = Field(
        1.0, gt=0, description="Temperature of the student's on-policy samples (rounds, and rollout grading for "
        "unit = pool).")
    max_new_tokens: int = Field(
        256, ge=1, description="Longest sampled response, in tokens, in the rounds and in rollout grading.")
    lora: bool = Field(False, description="Train a LoRA adapter (peft); the frozen teacher is the base.")
    lora_rank: int = Field(
        16, ge=1, description="Rank r of the LoRA adapter on every linear layer but the LM head (lora_alpha = 2r); "
        "lora = true only.")
    redundancy_map_samples: int = Field(
        8, ge=0, description="Rollouts of round 0 (a seeded choice) whose per-token divergences every round scores "
        "and saves for the redundancy map; 0 = no map.")
    save_every: int = Field(
        10, ge=1, description="Write a resumable checkpoint (weights, optimizer, RNG, EMA teacher, round index) "
        "every N rounds and after the last; not part of the cache key.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept; older ones are deleted.")
    seed: int = Field(0, description="Seed of the rounds' prompt order and sampling, the pool's candidate prompts "
                      "and rollout grading's samples, and the redundancy map's rollouts.")

    @field_validator("beta")
    @classmethod
    def _jsd_beta_inside(cls, beta: float, info: ValidationInfo) -> float:
        # At beta 0 or 1 the mixture equals one side and the JSD is exactly 0, gradient too
        # (kernels/divergence.py). TRL's generalised JSD means reverse / forward KL there.
        if info.data.get("divergence") == "jsd" and beta in (0.0, 1.0):
            kl = "reverse_kl" if beta == 1.0 else "forward_kl"
            raise ValueError(f"divergence jsd with beta {beta:g} is identically 0 and trains nothing; "
                             f"for what TRL's generalized JSD means at beta={beta:g}, set opsd.divergence={kl}")
        return beta

    @model_validator(mode="after")
    def _template_needs_text(self) -> "OPSDParams":
        if self.context == "template" and not self.context_template:
            raise ValueError("opsd.context_template is required when opsd.context is 'template'")
        return self


# --------------------------------------------------------------------------- eval
DEFAULT_EPISTEMIC_MARKERS = [
    "wait", "hmm", "perhaps", "maybe", "actually", "let me double-check", "let me check",
    "let me verify", "let me re-check", "on second thought", "alternatively",
]


class EvalParams(Section):
    """Stage evaluate (jobs/evaluate.py): k samples per problem, graded by math-verify (avg@k, pass@k)."""

    benchmarks: list[DatasetSpec] = Field(
        default_factory=list, description="Benchmarks beside the embedded eval split (named `synthetic`)."
    )
    include_synthetic: bool = Field(True, description="Evaluate on the embedded eval split.")
    k: int = Field(8, ge=1, description="Samples per problem (avg@k, pass@k).")
    temperature: float = Field(0.6, ge=0, description="Sampling temperature of the evaluation samples; 0 = greedy.")
    top_p: float = Field(
        0.95, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens whose probability mass "
        "reaches this fraction (top_k is off in evaluation).")
    max_new_tokens: int = Field(
        256, ge=1, description="Longest evaluation response, in tokens; longer ones are cut (finish_reason "
        "`length`) and graded as they are.")
    limit: int | None = Field(None, ge=1, description="Evaluate on the first `limit` problems of each benchmark.")
    epistemic_markers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EPISTEMIC_MARKERS),
        description="Phrases counted per 1k response tokens (case-insensitive, word-bounded).",
    )
    seed: int = Field(1234, description="Sampling seed of the evaluation (the same seed gives the same samples).")


# ------------------------------------------------------------------ length-penalty baseline
class LenPenParams(Section):
    """The length-penalty baseline (branch `lenpen`, model `rlvr-lenpen`; tasks/lenpen.py): the way RL
    compacts reasoning today. RLVR (the `rlvr` section's algorithm, lr and temperature) continues from
    the checkpoint OPSD starts from, for the rounds, prompts per round, samples per prompt, response
    length, prompt-order seed and held-out curve of the `opsd` section, with rlvr.length_penalty =
    `coefficient`: reward 1 - coefficient * L / max_new_tokens for a correct response of L tokens, 0
    for a wrong one."""

    coefficient: float = Field(
        0.5, gt=0, le=1, description="Length penalty a (rlvr.length_penalty of the baseline). A correct answer "
        "of the longest allowed length still earns 1 - a > 0, more than any wrong one, so the penalty never "
        "pays for giving up; with group-normalised advantages it ranks the correct answers of a group by "
        "length, which is what shortens them. 0.5: the middle of the range that keeps that ordering.")


# ------------------------------------------------------------------ report, promotion
class ReportParams(Section):
    """`compaction report`: the comparison table of one study (compaction/report.py)."""

    baseline: str = Field("rlvr", description="Model label (eval run tag `model`) that deltas are measured against.")
    scope: Literal["latest", "experiment"] = Field(
        "latest",
        description="`latest`: the eval runs of the latest flow run (root parent run) that has any; "
        "`experiment`: every finished eval run of the study, per model label the runs of its latest "
        "`policy_ref` (for studies built by several flow runs, e.g. one deployment per condition).",
    )
    bootstrap_samples: int = Field(2000, ge=100, description="Bootstrap resamples for the intervals.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the percentile bootstrap intervals.")
    seed: int = Field(0, description="Seed of the bootstrap (the same runs give the same intervals).")


class PromotionParams(Section):
    """The gate that puts alias `candidate` on a `compacted` model version (compaction/promotion.py)."""

    max_accuracy_drop: float = Field(
        2.0, ge=0,
        description="Largest accepted accuracy drop against the RLVR baseline, in percentage points, on "
        "every gated benchmark; the candidate must also answer with strictly fewer mean tokens on each.",
    )
    benchmarks: list[str] | None = Field(
        None, description="Benchmarks the gate checks; None = every benchmark the baseline was evaluated on."
    )


# ----------------------------------------------------------------------- tracking
class TrackingParams(Section):
    """Where runs, metrics and artifacts are recorded (MLflow)."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None = sqlite:///<root>/mlflow.db (absolute)."
    )
    artifact_root: str | None = Field(None, description="MLflow artifact root; None = <root>/mlartifacts.")
    experiment: str = Field("compaction-demo", description="One experiment per study.")
    system_metrics: bool = Field(True, description="Log CPU/memory (psutil) with each run.")


class LauncherParams(Section):
    """How the flows' tasks run their jobs (tasks/launch.py)."""

    kind: Literal["inline", "accelerate"] = Field(
        "inline", description="`inline` calls the job's main in-process; `accelerate` runs `accelerate launch -m`."
    )
    accelerate_config: str | None = Field(None, description="Path to an accelerate config (params/accelerate/*.yaml).")
    num_processes: int = Field(
        1, ge=1, description="Processes `accelerate launch` starts per job (--num_processes; kind = accelerate); a job "
        "that does not split its work (evaluation) runs one.")
    max_concurrent_jobs: int = Field(
        1, ge=1, description="Jobs (training, evaluation, rollout grading) that run at once, across the flows of "
        "one Prefect server: the slots of the global concurrency limit `compaction-jobs`. The condition "
        "branches of a flow are submitted together and wait for a slot. 1 on a CPU machine (a job uses "
        "every core); on a node of 8 GPUs, 8 / devices_per_job.")
    checkpoint_staging_dir: str | None = Field(
        "/dev/shm", description="RLVR and OPSD write their checkpoints in a background thread while the next rounds "
        "train (compaction.training.CheckpointWriter). Under FSDP (or with checkpoint_snapshot false) each is "
        "first written into this memory-backed folder and copied from there; it needs room for one checkpoint "
        "(weights and optimizer state: ~12-16 bytes a parameter, ~100-130 GB per node at Qwen3-8B). Less room "
        "there, a missing folder or null: written straight to the stage folder, the training loop waiting for "
        "the disk.")
    checkpoint_snapshot: bool = Field(
        True, description="Where every process holds whole tensors (one process, DDP; not FSDP): instead of files in "
        "checkpoint_staging_dir, copy the weights and optimizer state into host buffers kept for the job (the "
        "checkpoint's size in RAM, allocated once) and write them to the stage folder in the background "
        "(compaction.training.HostSnapshot). Ignored when checkpoint_staging_dir is null (direct writes).")
    devices_per_job: int | None = Field(
        None, ge=1, description="GPUs each concurrent job gets (CUDA_VISIBLE_DEVICES, launcher.kind = "
        "accelerate); None = every visible GPU, for one job at a time.")


class RegistryParams(Section):
    """Names in the MLflow model registry (no stage's cache key uses this section)."""

    rlvr_model: str = Field("rlvr", description="Registered model of RLVR checkpoints (alias `latest`).")
    compacted_model: str = Field("compacted", description="Registered model of OPSD results (tag `condition`).")


class PathParams(Section):
    """Folders, resolved to absolute paths at load time."""

    root: str = Field(
        ".", description="Project folder; relative to $COMPACTION_HOME or the working directory at load time."
    )
    artifacts: str = Field("artifacts", description="Stage outputs, relative to root unless absolute.")


class Params(Section):
    """All knobs of the pipeline. Sections are passed to the stages that use them."""

    study: str = Field("demo", description="Name of the study (MLflow experiment suffix, report folder).")
    seed: int = Field(
        0, description="The study seed this run belongs to (`compaction run study --seeds`), a tag on its MLflow "
        "runs. The study flow sets it together with the seed of every stage, which it derives from it "
        "(flows/study.py, seed_overrides); setting it alone changes no stage.")
    paths: PathParams = Field(default_factory=PathParams, description="Project and artifact folders.")
    data: DataParams = Field(default_factory=DataParams, description="The problems (stage data).")
    model: ModelParams = Field(default_factory=ModelParams, description="The base model and its loading.")
    sft: SFTParams = Field(default_factory=SFTParams, description="Stage sft.")
    rlvr: RLVRParams = Field(default_factory=RLVRParams, description="Stage rlvr.")
    rollout: RolloutParams = Field(default_factory=RolloutParams, description="The generation engine.")
    grading: GradingParams = Field(default_factory=GradingParams, description="The math-verify grader.")
    opsd: OPSDParams = Field(default_factory=OPSDParams, description="Stage opsd (and rollout grading).")
    lenpen: LenPenParams = Field(default_factory=LenPenParams, description="The length-penalty baseline.")
    eval: EvalParams = Field(default_factory=EvalParams, description="Stage evaluate.")
    report: ReportParams = Field(default_factory=ReportParams, description="`compaction report`.")
    promotion: PromotionParams = Field(default_factory=PromotionParams, description="The promotion gate.")
    tracking: TrackingParams = Field(default_factory=TrackingParams, description="MLflow tracking.")
    launcher: LauncherParams = Field(default_factory=LauncherParams, description="How jobs are launched.")
    registry: RegistryParams = Field(default_factory=RegistryParams, description="MLflow model registry names.")

    # -- derived, absolute locations -------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.paths.root)

    @property
    def artifacts_dir(self) -> Path:
        """``paths.artifacts``: every stage's outputs live under it."""
        return Path(self.paths.artifacts)

    def stage_dir(self, stage: str, key: str) -> Path:
        """``<artifacts>/<stage>/<key>/``: one stage's output for one set of inputs."""
        return self.artifacts_dir / stage / key

    def section_hash(self, *names: str) -> str:
        """Stable short hash of the named sections (for cache keys and artifact folders)."""
        payload = {n: getattr(self, n).model_dump(mode="json") for n in names}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ParamsError(ValueError):
    """A params file or override is invalid; the message names the file and the key."""


def _format_loc(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected key=value (e.g. --set sft.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ParamsError(f"--set {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None
    return key.split("."), value


def _known_field(model_cls: type[BaseModel], parts: list[str]) -> bool:
    """True when the dotted path names a field of the schema (checked before merging overrides)."""
    cls: Any = model_cls
    for i, part in enumerate(parts):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return False
        ann = cls.model_fields[part].annotation
        # Unwrap Optional[Section] / Section to keep walking.
        nested = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = nested[0] if nested else ann
        if i < len(parts) - 1 and not nested:
            return False
    return True


def _resolve_paths(params: Params, base: Path) -> Params:
    root = Path(params.paths.root)
    root = (root if root.is_absolute() else base / root).resolve()
    artifacts = Path(params.paths.artifacts)
    artifacts = artifacts if artifacts.is_absolute() else root / artifacts
    params.paths.root = str(root)
    params.paths.artifacts = str(artifacts.resolve())
    if params.tracking.tracking_uri is None:
        params.tracking.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    if params.tracking.artifact_root is None:
        params.tracking.artifact_root = str(root / "mlartifacts")
    return params


def add_params_args(parser, default: str | None = "params/demo.yaml") -> None:
    """``--params FILE`` and ``--set KEY=VALUE`` (repeatable) on an argparse parser: every command
    line that loads params (the jobs, the ``compaction`` command) takes them the same way."""
    parser.add_argument("--params", default=default, help=f"params YAML file (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param, e.g. --set rollout.n=8 (repeatable)")


def load_params(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), base: Path | None = None) -> Params:
    """Load a params file (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    Raises :class:`ParamsError` naming the file and the offending key on a missing file,
    invalid YAML, an unknown key or a wrong type.
    """
    origin = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError(f"{origin}: params file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{origin}: invalid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ParamsError(f"{origin}: top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        parts, value = _parse_override(item)
        if not _known_field(Params, parts):
            raise ParamsError(f"{origin}: --set {'.'.join(parts)}: unknown key")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = _format_loc(err["loc"]) or "<top>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{origin}: {key}: {msg}")
        raise ParamsError("\n".join(lines)) from None
    home = base or Path(os.environ.get("COMPACTION_HOME", os.getcwd()))
    return _resolve_paths(params, home)


def dump_params(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as JSON text), for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out
