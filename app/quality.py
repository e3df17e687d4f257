"""A quality signal that needs no dataset: how far a reducing side's next-token distribution is from the
full model's on the same conversation.

- KL divergence KL(full || reduced) of the first answer token's distribution, in nats: 0 when the
  reduction changes nothing the model would say next.  It is free when the other side runs the full
  model on the same prompt (turn 1, or identical histories); otherwise it needs one reference prefill
  with every visual token, which the quality check runs.
- With the quality check on, the full side's answer is also scored under the reducing side (teacher
  forcing: its mean log-probability per token and the perplexity exp(-mean)), one more forward.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class SideOutput:
    """What a finished side leaves for the quality signal: plain CPU data."""

    first_logprobs: torch.Tensor  # (V,) float32 log-softmax of the first answer token's logits
    answer_ids: torch.Tensor  # (A,) the generated token ids


def first_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """(1, V) or (V,) logits -> (V,) float32 log-probabilities on the CPU."""
    return logits.reshape(-1).float().log_softmax(dim=-1).cpu()


def kl_divergence(reference: torch.Tensor, reduced: torch.Tensor) -> float:
    """KL(reference || reduced) in nats, from two (V,) log-probability vectors (float64 sum)."""
    p = reference.double().exp()
    return float((p * (reference.double() - reduced.double())).sum().clamp(min=0.0))


def prompt_logits(prepared, extra_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(L, V) logits of one side's prepared prompt (followed by `extra_ids`, teacher-forced) under its mode."""
    prepared = dataclasses.replace(prepared, reuse=None)  # a whole prefill (the cache is the next turn's)
    loaded = prepared.loaded
    with torch.inference_mode(), prepared.use():
        inputs = dict(prepared.generate_inputs(prepared.encode()))
        if extra_ids is not None and len(extra_ids):
            extra = extra_ids.to(loaded.device)[None]
            if "inputs_embeds" in inputs:  # video: embeddings built by hand
                embeds = loaded.model.get_input_embeddings()(extra)
                inputs["inputs_embeds"] = torch.cat([inputs["inputs_embeds"], embeds.to(inputs["inputs_embeds"])], 1)
            else:
                inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
            if "mm_token_type_ids" in inputs:  # Qwen2.5-VL places its positions by them: the answer is text
                inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
        return loaded.model(**inputs).logits[0].float()


def score_answer(prepared, answer_ids: torch.Tensor) -> tuple[float, float]:
    """(mean log-probability per token, perplexity) of `answer_ids` after this side's prompt."""
    logits = prompt_logits(prepared, answer_ids)  # (L + A, V)
    count = len(answer_ids)
    predicted = logits[-count - 1 : -1].log_softmax(dim=-1).cpu()  # the positions that predict the answer
    mean = float(predicted.gather(1, answer_ids.cpu()[:, None]).mean())
    return mean, math.exp(-mean)
