"""Rollouts with vLLM's offline ``LLM`` API (the `vllm` extra; GPU only)."""

from __future__ import annotations

from typing import Sequence

from compaction.rollout.base import Completion, Sampling


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


class VLLMEngine:
    def __init__(self, ref: str, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 tensor_parallel_size: int = 1, seed: int = 0):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(
                "rollout.backend=vllm needs the vllm extra: pip install 'compaction[vllm]' (GPU only)"
            ) from exc
        self.llm = LLM(model=ref, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       tensor_parallel_size=tensor_parallel_size, seed=seed)

    def generate(self, prompts: Sequence[str], sampling: Sampling, progress: bool = False) -> list[list[Completion]]:
        from vllm import SamplingParams

        sp = SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
        )
        outputs = self.llm.generate(list(prompts), sp, use_tqdm=progress)
        return [
            [Completion(o.text, list(o.token_ids), "length" if o.finish_reason == "length" else "stop")
             for o in req.outputs]
            for req in outputs
        ]

    def close(self) -> None:
        self.llm = None
