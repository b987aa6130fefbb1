"""Rollouts for RL: G samples per prompt through the engine, as training tensors.

The engine does the sampling (batched, KV cache, tools run); this turns its Completions into the
shifted (input_ids, labels, response_mask) rows of losses.tokenize_prompt_and_output, with every token
the engine inserted (tool output, mask 0 in Completion.mask) masked out of the loss: the policy is
never trained to produce, nor penalised for, text it did not write.
"""

from __future__ import annotations

from typing import Sequence

import torch

from chatforge.losses import tokenize_prompt_and_output


def rollout_batch(engine, prompts: Sequence[Sequence[int]], group_size: int, pad_id: int = 0, **sampling) -> dict:
    """Sample group_size replies to each prompt (token ids) with engine.generate(prompts, n=group_size,
    **sampling) and return, for the len(prompts) * group_size rollouts (prompt-major: prompt 0's
    group first, as compute_group_normalized_rewards expects):

        input_ids, labels  (N, L-1)  prompt + reply, right-padded with pad_id, shifted by one
        response_mask      (N, L-1)  bool, 1 where labels[t] is a reply token the model sampled
                                     (0: prompt, padding, tool output inserted by the engine)
        completions        the N Completions (text for the verifier, tool_calls, finish_reason)
        prompt_index       (N,) the prompt of each rollout
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    comps = engine.generate(list(prompts), n=group_size, **sampling)
    rows_prompts = [list(prompts[c.prompt_index]) for c in comps]
    batch = tokenize_prompt_and_output(rows_prompts, [c.tokens for c in comps], None, pad_id)
    mask = batch["response_mask"]  # (N, L-1): labels that are reply tokens
    for b, c in enumerate(comps):
        # reply token i is label position len(prompt) - 1 + i
        start = len(rows_prompts[b]) - 1
        sampled = torch.tensor(c.mask, dtype=torch.bool)  # (len(reply),)
        mask[b, start:start + len(c.tokens)] &= sampled
    batch["completions"] = comps
    batch["prompt_index"] = torch.tensor([c.prompt_index for c in comps], dtype=torch.long)
    return batch
