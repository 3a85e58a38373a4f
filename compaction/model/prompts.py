"""Prompts are always built with the model's own chat template (thinking enabled where it has it)."""

from __future__ import annotations

from typing import Any

#: Appended to every problem, as the standard math-eval prompt does for real models.
ANSWER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


#: How the OPSD teacher is shown its privileged context (docs/decisions.md, "OPSD").
SOLUTION_CONTEXT = "Reference solution:\n{solution}"
ANSWER_CONTEXT = "Reference answer: {answer}"


def prompt_boilerplate() -> list[str]:
    """The fixed text of every prompt built here: role names, the answer instruction, the teacher's
    context headers. The embedded tokenizer trains on it once, so where its vocabulary has room a
    prompt's boilerplate is ~15 words, not ~35 letters and fragments (a real tokenizer has these words);
    seen only once, it takes no merges from the domain's text when the vocabulary is small."""
    return ["user\n" + ANSWER_INSTRUCTION, "assistant\n",
            SOLUTION_CONTEXT.format(solution=""), ANSWER_CONTEXT.format(answer="")]


def build_student_messages(problem: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{problem}\n{ANSWER_INSTRUCTION}"}]


def build_teacher_messages(problem: str, context: str) -> list[dict[str, str]]:
    """The student's user message with the privileged ``context`` between the problem and the
    instruction: one user turn, so the teacher is asked the same task the student answered."""
    return [{"role": "user", "content": f"{problem}\n\n{context}\n\n{ANSWER_INSTRUCTION}"}]


def build_prompt(tokenizer: Any, messages: list[dict[str, str]], enable_thinking: bool = True) -> str:
    """Render ``messages`` with the tokenizer's chat template, ending with the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
