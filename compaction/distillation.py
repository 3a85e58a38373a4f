"""On-policy self-distillation pieces: the teacher's privileged prompt, student/teacher alignment,
the student's loss module, and the teacher's weights (EMA, LoRA merge).

Alignment. A rollout's response y (``response_token_ids``: the sampled ids, never re-tokenised
text) follows two prompts: the student's (the problem) and the teacher's (the problem plus a
privileged context). The sequences are ``student_prompt + y`` and ``teacher_prompt + y``; the
token y_t is predicted by the hidden state just before it in each. Batches are right-padded and
``score_mask`` marks y in each sequence, so taking the predicting rows with a boolean mask
(row-major: sequence by sequence, position by position) packs both sides to [N, d] in the same
order, whatever the two prompt lengths. The targets taken the same way are y in both, which
:func:`response_rows` callers check.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pandas as pd
import torch
from torch import nn

from compaction.model.prompts import ANSWER_CONTEXT, SOLUTION_CONTEXT, build_prompt, build_teacher_messages
from compaction.params import OPSDParams
from compaction.scoring import backbone_hidden, causal_lm, lm_head_weight, shifted_targets
from compaction.training import pad_batch

#: Placeholders a context template may use.
CONTEXT_FIELDS = ("problem", "solution", "answer")


# --------------------------------------------------------------------------- privileged context
def template_fields(template: str) -> list[str]:
    """Placeholder names in a str.format template (``{}`` gives '', ``{a.b}`` gives 'a.b')."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def check_context(cfg: OPSDParams) -> None:
    """Fail before any work on a template placeholder other than {problem}, {solution}, {answer}."""
    if cfg.context != "template":
        return
    try:
        fields = template_fields(cfg.context_template or "")
    except ValueError as exc:  # e.g. a single '{'
        raise ValueError(f"opsd.context_template: not a valid format string ({exc}); "
                         "write literal braces as '{{' and '}}'") from None
    unknown = sorted({f for f in fields if f not in CONTEXT_FIELDS})
    if unknown:
        names = ", ".join("{" + f + "}" for f in unknown)
        raise ValueError(f"opsd.context_template: unknown placeholder(s) {names}; "
                         "use {problem}, {solution}, {answer}")


def uses_solution(cfg: OPSDParams) -> bool:
    return cfg.context == "solution" or (
        cfg.context == "template" and "solution" in template_fields(cfg.context_template or ""))


def has_solution(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_solutions(cfg: OPSDParams, problems: pd.DataFrame, source: str) -> None:
    """With ``missing_solution: error``, fail before any work naming the problems without one."""
    if not uses_solution(cfg) or cfg.missing_solution != "error":
        return
    missing = problems.loc[~problems["solution"].map(has_solution), "problem_id"].tolist()
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} training problem(s) have no reference solution, e.g. problem_id "
            f"{', '.join(map(str, missing[:5]))} (opsd.context={cfg.context}, opsd.missing_solution=error; "
            "set opsd.missing_solution=answer to give those the final answer instead)")


def privileged_context(cfg: OPSDParams, problem: Mapping[str, Any]) -> str:
    """The teacher's extra text for one problem row (problem_id, problem, solution, answer)."""
    solution = problem.get("solution")
    if uses_solution(cfg) and not has_solution(solution):
        if cfg.missing_solution == "error":
            raise ValueError(f"problem_id {problem['problem_id']}: no reference solution "
                             f"(opsd.context={cfg.context}, opsd.missing_solution=error)")
        return ANSWER_CONTEXT.format(answer=problem["answer"])
    if cfg.context == "solution":
        return SOLUTION_CONTEXT.format(solution=solution)
    if cfg.context == "answer":
        return ANSWER_CONTEXT.format(answer=problem["answer"])
    fields = {"problem": problem["problem"], "solution": solution if has_solution(solution) else "",
              "answer": problem["answer"]}
    return cfg.context_template.format_map(fields)


def teacher_prompt(tokenizer, cfg: OPSDParams, problem: Mapping[str, Any], enable_thinking: bool) -> str:
    """The teacher's prompt text: the student's user message plus the privileged context, rendered
    with the model's own chat template."""
    messages = build_teacher_messages(problem["problem"], privileged_context(cfg, problem))
    return build_prompt(tokenizer, messages, enable_thinking)


# --------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class Pair:
    """One rollout as the student and the teacher see it: prompt ids + y, and where y starts."""

    rollout_id: str
    student_ids: list[int]
    student_start: int
    teacher_ids: list[int]
    teacher_start: int

    @property
    def n_tokens(self) -> int:
        return len(self.student_ids) - self.student_start


def build_pairs(tokenizer, rollouts: pd.DataFrame, teacher_prompts: Mapping[str, str]) -> list[Pair]:
    """A :class:`Pair` per rollout with a non-empty response (rollouts need prompt, problem_id,
    response_token_ids); ``teacher_prompts`` maps problem_id to the teacher's prompt text."""
    ids: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:  # prompts repeat across a problem's samples
        if text not in ids:
            ids[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[text]

    pairs = []
    for rid, prompt, pid, y in zip(rollouts["rollout_id"], rollouts["prompt"], rollouts["problem_id"],
                                   rollouts["response_token_ids"]):
        y = [int(t) for t in y]
        if not y:
            continue
        s, t = encode(prompt), encode(teacher_prompts[pid])
        pairs.append(Pair(rid, s + y, len(s), t + y, len(t)))
    return pairs


def pack_pairs(pairs: list[Pair], pad_id: int, device=None) -> tuple[dict, dict]:
    """(student batch, teacher batch): right-padded, ``score_mask`` marking y in each."""
    student = pad_batch([p.student_ids for p in pairs], [p.student_start for p in pairs], pad_id)
    teacher = pad_batch([p.teacher_ids for p in pairs], [p.teacher_start for p in pairs], pad_id)
    if device is not None:
        student = {k: v.to(device) for k, v in student.items()}
        teacher = {k: v.to(device) for k, v in teacher.items()}
    return student, teacher


def response_rows(hidden: torch.Tensor, input_ids: torch.Tensor, score_mask: torch.Tensor):
    """(rows [N, d], targets [N]): the hidden states that predict the scored tokens, sequence by
    sequence in order, and those tokens."""
    predict, targets = shifted_targets(input_ids, score_mask)
    return hidden[:, :-1][predict], targets


def response_hidden(model: nn.Module, batch: Mapping[str, torch.Tensor]):
    """:func:`response_rows` of ``model``'s last hidden states on a packed batch."""
    hidden = backbone_hidden(model, batch["input_ids"], batch["attention_mask"])
    return response_rows(hidden, batch["input_ids"], batch["score_mask"])


class DistillationStudent(nn.Module):
    """The student LM; ``forward`` returns the per-token divergence [N] to given teacher rows.

    The LM head runs inside forward (DDP/FSDP see only parameters used there), through
    ``kernels.linear_divergence``: no [N x V] logits are held, and the teacher's rows and
    weight are constants (no gradient reaches them).
    """

    def __init__(self, model: nn.Module, kind: str, beta: float, temperature: float, clip: float | None,
                 backend: str = "auto"):
        super().__init__()
        self.model = model
        self.kind, self.beta, self.temperature, self.clip, self.backend = kind, beta, temperature, clip, backend

    def forward(self, input_ids, attention_mask, score_mask, teacher_hidden, teacher_weight, teacher_targets=None):
        from kernels import linear_divergence

        rows, targets = response_hidden(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                                     "score_mask": score_mask})
        if teacher_targets is not None and not torch.equal(targets, teacher_targets):
            raise RuntimeError("student and teacher sequences do not end in the same response tokens")
        return linear_divergence(rows, lm_head_weight(self.model), teacher_hidden, teacher_weight,
                                 kind=self.kind, beta=self.beta, temperature=self.temperature, clip=self.clip,
                                 targets=targets, backend=self.backend)


# --------------------------------------------------------------------------- teacher weights
@torch.no_grad()
def ema_update(teacher: nn.Module, student_weights: Mapping[str, torch.Tensor], decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter (HF names)."""
    for name, p in teacher.named_parameters():
        p.lerp_(student_weights[name].detach().to(p.dtype), 1.0 - decay)


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """A peft LoRA adapter on every linear layer but the LM head; only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", bias="none")
    return get_peft_model(model, config)


def lora_scalings(peft_model: nn.Module) -> dict[str, float]:
    """{HF module name: scaling} of the active adapter's LoRA layers."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in causal_lm(peft_model).named_modules():
        if isinstance(module, LoraLayer):
            adapter = module.active_adapters[0]
            out[name] = float(module.scaling[adapter])
    return out


def merged_lora_weights(named: Iterable[tuple[str, torch.Tensor]], scalings: Mapping[str, float],
                        adapter: str = "default") -> dict[str, torch.Tensor]:
    """HF-named weights with each LoRA delta merged in: W + scaling * B @ A.

    ``named`` = (name, tensor) of a peft model's state or parameters, with or without wrapper
    prefixes (everything up to ``base_model.model.`` is dropped). Works on a gathered state dict,
    so it serves saving under FSDP as well as the EMA update.
    """
    base, lora_a, lora_b = {}, {}, {}
    for name, tensor in named:
        name = name.split("base_model.model.", 1)[-1]
        if f".lora_A.{adapter}." in name:
            lora_a[name.split(".lora_A.")[0]] = tensor
        elif f".lora_B.{adapter}." in name:
            lora_b[name.split(".lora_B.")[0]] = tensor
        elif ".lora_" not in name:
            base[name.replace(".base_layer.", ".")] = tensor
    for module, a in lora_a.items():
        key = f"{module}.weight"
        w = base[key]
        base[key] = (w.float() + scalings[module] * (lora_b[module].float() @ a.float())).to(w.dtype)
    return base
