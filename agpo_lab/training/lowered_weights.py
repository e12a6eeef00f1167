"""Frozen weights cast to the update's lower precision once, instead of in every pass.

Under `torch.autocast` a float32 Linear weight is cast to bfloat16 at each call. Autocast keeps
the cast only for leaves that require grad, and only until its region ends, so a frozen weight
(LoRA's base layers, the KL reference's copy) is cast again in every pass of every step: 134 M
values read and written per pass on SmolLM2, the largest item after the matrix products in a
profile of a LoRA step under `optim.precision=bfloat16`. Frozen weights never change, so their
bfloat16 copies are made once and swapped in while the update runs. Autocast leaves a weight
already in its dtype as it is, and the copy is what autocast's own cast makes (`Tensor.to`, round
to nearest even), so the results are bitwise the same (tests/test_lowered_weights.py).

A frozen LM head tied to the input embedding (SmolLM2's) cannot change its tensor in place: the
embedding's output would then start the residual stream in bfloat16. The head module gets its own
bfloat16 parameter instead, and the shared one back after the block.

peft's LoRA layers also cast their input to the adapters' float32 before autocast casts it back to
bfloat16; for an input already in bfloat16 that round trip is lossless, so it is switched off
inside the block too (`peft.helpers.disable_input_dtype_casting`).

With `activations` (optim.lowered_activations) the block also carries the activations in the lower
dtype: the input embedding's output is cast (so the residual stream stays bfloat16: a bfloat16
layer output added to a bfloat16 residual) and frozen norm weights get their copies too (an RMSNorm
returns weight * x, float32 with a float32 weight). That is FSDP's mixed precision with
param_dtype=bfloat16 rather than autocast's float32 residual stream: different rounding, not
bitwise the same as without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch


def frozen_linear_tensors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The float32 weights and biases of `model`'s Linear layers that are frozen (requires_grad
    False) and not shared with its input embedding, each once."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(embed.weight)} if isinstance(embed, torch.nn.Module) else set()
    found: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for p in (module.weight, module.bias):
            frozen = p is not None and not p.requires_grad and p.dtype == torch.float32
            if frozen and id(p) not in tied:
                found[id(p)] = p
    return list(found.values())


def frozen_norm_tensors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The frozen float32 parameters of `model`'s modules that are neither Linear nor Embedding
    layers (its norms' weights, in a Llama-family model), each once."""
    found: dict[int, torch.nn.Parameter] = {}
    skip = (torch.nn.Linear, torch.nn.Embedding)
    for module in model.modules():
        if isinstance(module, skip):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32:
                found[id(p)] = p
    return list(found.values())


def _lower_output(dtype: torch.dtype):
    """A forward hook casting a module's floating output to `dtype`."""

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype) if output.is_floating_point() else output

    return hook


def _frozen_tied_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when it is a Linear whose frozen float32 weight is its input
    embedding's, else None."""
    if not hasattr(model, "get_output_embeddings"):
        return None
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, torch.nn.Linear) or not isinstance(embed, torch.nn.Module):
        return None
    w = head.weight
    tied = w is embed.weight and not w.requires_grad and w.dtype == torch.float32
    return head if tied else None


class LoweredFrozenWeights:
    """Lower-precision copies of models' frozen Linear weights, kept between steps.

    Example: ``with lowered.applied(policy):`` runs the block with each frozen float32 Linear
    weight of `policy` holding its bfloat16 copy, and restores the float32 tensors after it, also
    on an exception. Forward and backward must both run inside the block: autograd keeps the
    weight it used. A weight changed in place (a loaded checkpoint) is cast again.
    """

    def __init__(self, dtype: torch.dtype | None, activations: bool = False):
        self.dtype = dtype  # None: the update runs in the weights' own precision, nothing to swap
        self.activations = activations  # also the residual stream and frozen norms (see module)
        self._copies: dict[int, tuple[int, int, torch.Tensor]] = {}

    def _copy(self, p: torch.nn.Parameter) -> torch.Tensor:
        key = (p.data_ptr(), p._version)
        cached = self._copies.get(id(p))
        if cached is None or cached[:2] != key:
            cached = (*key, p.detach().to(self.dtype))
            self._copies[id(p)] = cached
        return cached[2]

    def lower_for_good(self, model: torch.nn.Module) -> None:
        """Replace `model`'s frozen float32 Linear weights by their lower-precision copies for
        good, and give a frozen tied head its own copy: for a network only ever run in the lower
        precision (the full-fine-tuning KL reference), whose float32 weights are then not kept."""
        if self.dtype is None:
            return
        for p in frozen_linear_tensors(model):
            p.data = p.data.to(self.dtype)
        head = _frozen_tied_head(model)
        if head is not None:
            low = head.weight.detach().to(self.dtype)
            head._parameters["weight"] = torch.nn.Parameter(low, requires_grad=False)

    @contextmanager
    def applied(self, *models: torch.nn.Module | None) -> Iterator[None]:
        swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        with ExitStack() as stack:
            try:
                for model in models if self.dtype is not None else ():
                    if model is None:
                        continue
                    if hasattr(model, "peft_config"):  # peft is imported only for peft models
                        from peft.helpers import disable_input_dtype_casting

                        stack.enter_context(disable_input_dtype_casting(model))
                    lowered = frozen_linear_tensors(model)
                    if self.activations:
                        lowered += frozen_norm_tensors(model)
                        embed = model.get_input_embeddings()
                        handle = embed.register_forward_hook(_lower_output(self.dtype))
                        stack.callback(handle.remove)
                    for p in lowered:
                        low = self._copy(p)
                        swapped.append((p, p.data))
                        p.data = low
                    head = _frozen_tied_head(model)
                    if head is not None:
                        tied = head.weight
                        low = torch.nn.Parameter(self._copy(tied), requires_grad=False)
                        head._parameters["weight"] = low
                        stack.callback(head._parameters.__setitem__, "weight", tied)
                yield
            finally:
                for p, original in reversed(swapped):
                    p.data = original
