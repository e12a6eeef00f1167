"""The KL reference policy: what the policy's log-probs are pulled towards when beta > 0.

Under full fine-tuning it is a frozen deep copy of the starting policy; under LoRA it is the same
network with its adapters switched off (peft's `disable_adapter()`), so no second copy of the
weights is kept. With beta = 0 there is no KL term and no reference at all.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import Tensor

from agpo_lab.config import ModelConfig
from agpo_lab.rollout.inputs import eval_mode
from agpo_lab.rollout.logprobs import completion_logprobs
from agpo_lab.training.batch import RowBatch


class ReferencePolicy:
    """The KL reference: a frozen model, or the LoRA policy with its adapters switched off."""

    def __init__(self, model: torch.nn.Module, *, disable_adapters: bool = False):
        self.model = model
        self.disable_adapters = disable_adapters

    @torch.no_grad()
    def logprobs(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        *,
        temperature: float = 1.0,
        share_prompts: bool = False,
        pack_rows: bool = False,
    ) -> Tensor:
        """Reference log-probs [B, C] of the completion tokens (0 on padding), without gradients;
        share_prompts and pack_rows as in `completion_logprobs`."""
        adapters_off = self.model.disable_adapter() if self.disable_adapters else nullcontext()
        with eval_mode(self.model), adapters_off:
            return completion_logprobs(
                self.model,
                prompt_ids,
                prompt_mask,
                completion_ids,
                completion_mask,
                temperature=temperature,
                share_prompts=share_prompts,
                pack_rows=pack_rows,
            )


def load_reference(
    policy: torch.nn.Module, cfg: ModelConfig, beta: float
) -> ReferencePolicy | None:
    """The reference for a KL weight `beta`: None when beta == 0 (nothing kept in memory)."""
    if beta < 0:
        raise ValueError(f"beta (KL weight) must be >= 0, got {beta}")
    if beta == 0:
        return None
    if cfg.lora:
        if not hasattr(policy, "disable_adapter"):
            raise ValueError(
                "model.lora is set but the policy is not a peft model; load it with load_policy"
            )
        return ReferencePolicy(policy, disable_adapters=True)
    frozen = copy.deepcopy(policy).eval()
    frozen.requires_grad_(False)
    return ReferencePolicy(frozen)


def reference_logprobs(
    reference: ReferencePolicy | None,
    batch: RowBatch,
    chunks: list[Tensor],
    temperature: float,
    share_prompts: bool = False,
    pack_rows: bool = False,
) -> Tensor | None:
    """Frozen reference log-probs [B, C] of the batch (no gradient), computed over trimmed
    micro-batches `chunks` (in the layouts share_prompts and pack_rows allow); None without a
    reference (beta = 0)."""
    if reference is None:
        return None
    ref = torch.zeros_like(batch.old_logprobs)
    for chunk in chunks:
        logps = reference.logprobs(
            *batch.select(chunk).trimmed().model_inputs,
            temperature=temperature,
            share_prompts=share_prompts,
            pack_rows=pack_rows,
        )
        ref[chunk, : logps.shape[1]] = logps
    return ref
