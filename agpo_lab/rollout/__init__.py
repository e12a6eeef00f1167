"""Rollout: sample G completions per prompt with the current policy, with their log-probs.

    generate(model, tokenizer, prompts, RolloutConfig(...)) -> Rollout
    completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)

decode.py is the loop; sampling.py draws tokens; kv_cache.py and fast_decode.py make a decode step
cheap; inputs.py pads prompts; logprobs.py recomputes log-probs for the loss (packing.py lays rows
out without padding for it, token_logprobs.py is its fused log-softmax-and-pick; precision.py the
lower-precision context).
"""

from agpo_lab.rollout.decode import Rollout, generate
from agpo_lab.rollout.logprobs import completion_logprobs

__all__ = ["Rollout", "completion_logprobs", "generate"]
