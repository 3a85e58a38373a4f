"""Rollout engines (the policy in this process; a vLLM server) and the rollouts table they produce."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from compaction.artifacts import write_parquet
from compaction.data.schema import ROLLOUT_COLUMNS, rollout_id
from compaction.model.prompts import build_prompt, build_student_messages
from compaction.params import ModelParams, RolloutParams
from compaction.rollout.base import Completion, RolloutEngine, Sampling
from compaction.rollout.hf import HFEngine
from compaction.rollout.vllm_server import VLLMServer, VLLMServerEngine, VLLMServerError, eos_token_ids, write_weights

__all__ = [
    "Completion", "HFEngine", "RolloutEngine", "Sampling", "VLLMServer", "VLLMServerEngine", "VLLMServerError",
    "eos_token_ids", "generate_rollouts", "make_engine", "sampling_from", "vllm_server", "write_rollouts",
    "write_weights",
]


def sampling_from(rollout: RolloutParams, **changes) -> Sampling:
    s = dict(n=rollout.n, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
             max_new_tokens=rollout.max_new_tokens, seed=rollout.seed)
    s.update(changes)
    return Sampling(**s)


def vllm_server(policy_ref: str, rollout: RolloutParams, model: ModelParams, log_path: str | Path | None = None,
                started: bool = True) -> VLLMServer:
    """The job's vLLM server on ``policy_ref`` (``rollout.vllm_url``: the running one), healthy."""
    import torch

    dtype = model.dtype if model.dtype != "auto" else "bfloat16" if torch.cuda.is_available() else "float32"
    server = VLLMServer(policy_ref, url=rollout.vllm_url, seed=rollout.seed, dtype=dtype,
                        max_model_len=rollout.vllm_max_model_len,
                        tensor_parallel_size=rollout.vllm_tensor_parallel_size,
                        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
                        cpu_kv_cache_gib=rollout.vllm_cpu_kv_cache_gib,
                        startup_timeout_s=rollout.vllm_startup_timeout_s, log_path=log_path)
    return server.start() if started else server


def make_engine(policy_ref: str, rollout: RolloutParams, model: ModelParams, device: str = "cpu") -> RolloutEngine:
    """The evaluation / rollout-grading engine on ``policy_ref``; ``close()`` it (a vLLM server
    started for it is stopped then; with ``rollout.vllm_url`` the running server gets the
    checkpoint's weights)."""
    if rollout.backend == "vllm":
        from compaction.model import load_tokenizer

        tokenizer = load_tokenizer(model.tokenizer or policy_ref)
        server = vllm_server(policy_ref, rollout, model)
        try:
            engine = VLLMServerEngine(server, tokenizer, eos_token_ids(policy_ref, tokenizer))
            if server.external:
                engine.reload(policy_ref)
        except BaseException:
            server.close()
            raise
        return engine
    return HFEngine.from_pretrained(policy_ref, dtype=model.dtype, device=device, batch_size=rollout.batch_size,
                                    decoder=rollout.hf_decoder)


def generate_rollouts(
    engine: RolloutEngine, tokenizer, problems: pd.DataFrame, sampling: Sampling, policy_ref: str,
    round_: int = 0, enable_thinking: bool = True, progress: bool = False, token_ids: bool = False,
) -> pd.DataFrame:
    """Sample ``sampling.n`` responses per problem; one row per response, in the rollouts schema.

    ``token_ids=True`` adds ``response_token_ids``: the sampled ids themselves, which training
    must use (re-tokenising the decoded text need not give the same ids).
    """
    prompts = [build_prompt(tokenizer, build_student_messages(p), enable_thinking) for p in problems["problem"]]
    completions = engine.generate(prompts, sampling, progress=progress)
    rows = []
    for pid, prompt, outs in zip(problems["problem_id"], prompts, completions):
        for k, c in enumerate(outs):
            rows.append({
                "rollout_id": rollout_id(policy_ref, pid, round_, sampling.seed, k),
                "problem_id": pid, "sample_index": k, "policy_ref": policy_ref, "prompt": prompt,
                "response": c.text, "response_tokens": c.n_tokens, "finish_reason": c.finish_reason,
                "temperature": float(sampling.temperature), "seed": int(sampling.seed), "round": int(round_),
                **({"response_token_ids": c.token_ids} if token_ids else {}),
            })
    return pd.DataFrame(rows, columns=list(ROLLOUT_COLUMNS) + (["response_token_ids"] if token_ids else []))


def write_rollouts(df: pd.DataFrame, path: str | Path) -> Path:
    missing = [c for c in ROLLOUT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"rollouts for {path}: missing column(s) {missing}")
    return write_parquet(df, path)
