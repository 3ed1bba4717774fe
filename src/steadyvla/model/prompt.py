"""OpenVLA's prompt and the training sequence built from it, with loss only on action tokens + EOS.

Training sequence (token ids):  <s> tok("In: What action should the robot take to {instr}?\nOut: ")
                                 a_1 ... a_A </s>
The trailing space of "Out: " tokenizes to the bare "▁" piece (id 29871 for Llama-2), which is the
token OpenVLA appends at inference before generating actions. Labels are IGNORE_INDEX everywhere
except the action tokens and the final </s>.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
DEFAULT_PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut: "
# The users' default wrapper of the instruction in the method's probe forwards (ICSM and Thermostat);
# config key `prompt_template`. The training prompt is always DEFAULT_PROMPT_TEMPLATE.
PROBE_PROMPT_TEMPLATE = "In: {instruction}\nOut:"


def probe_template(template: str | None) -> str:
    """The probe prompt wrapper for config value `template` (None = the users' default)."""
    return template if template is not None else PROBE_PROMPT_TEMPLATE


def format_prompt(instruction: str, template: str | None = None) -> str:
    """The prompt text for one instruction (lower-cased and stripped, as OpenVLA does)."""
    text = instruction.strip().lower().rstrip(".")
    return (template or DEFAULT_PROMPT_TEMPLATE).format(instruction=text)


@dataclass(frozen=True)
class TokenizedSample:
    """One training example's token ids and labels (1-D int64 tensors of equal length)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    instruction_span: tuple[int, int]  # [start, end) token positions of the instruction text


class PromptBuilder:
    """Builds token ids + masked labels for (instruction, action tokens) pairs."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template or DEFAULT_PROMPT_TEMPLATE
        if "{instruction}" not in self.template:
            raise ValueError(f"prompt_template {self.template!r} must contain '{{instruction}}'")
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)

    def encode_prompt(self, instruction: str) -> tuple[list[int], tuple[int, int]]:
        """<s> + tokens of the prompt text (no actions, no </s>), and the token positions
        [start, end) covered by the instruction, from one tokenization.

        The span comes from the character offsets of the real tokenization, so it is exact for any
        template and (fast) tokenizer; tokens that straddle the boundary count as instruction tokens.
        """
        text = format_prompt(instruction, self.template)
        start_char = len(self.template.split("{instruction}")[0])
        end_char = start_char + len(format_prompt(instruction, "{instruction}"))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        positions = [
            i + 1  # +1 for the <s> we prepend
            for i, (a, b) in enumerate(enc["offset_mapping"])
            if b > start_char and a < end_char and b > a
        ]
        span = (positions[0], positions[-1] + 1) if positions else (0, 0)
        return [self.bos_id] + list(enc["input_ids"]), span

    def prompt_ids(self, instruction: str) -> list[int]:
        """<s> + tokens of the prompt text."""
        return self.encode_prompt(instruction)[0]

    def instruction_span(self, instruction: str) -> tuple[int, int]:
        """Token positions [start, end) of the instruction in `prompt_ids(instruction)`."""
        return self.encode_prompt(instruction)[1]

    def build(self, instruction: str, action_token_ids: np.ndarray) -> TokenizedSample:
        """Full training sequence; labels cover the action tokens and </s> only."""
        prompt, span = self.encode_prompt(instruction)
        actions = [int(t) for t in action_token_ids]
        input_ids = torch.tensor(prompt + actions + [self.eos_id], dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[len(prompt):] = input_ids[len(prompt):]
        return TokenizedSample(input_ids, labels, span)
