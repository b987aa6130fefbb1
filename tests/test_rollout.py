"""rollout_batch: engine rollouts as training rows, with tool output the engine inserted masked out of
the loss (a scripted model makes a python call; a real random model checks the log-prob alignment)."""

from __future__ import annotations

import torch

from chatforge.engine import Engine
from chatforge.losses import get_response_log_probs
from chatforge.rollout import rollout_batch
from chatforge.tools import Tool
from engine_helpers import ScriptedModel, random_model, train_tokenizer

torch.set_num_threads(1)


def test_tool_output_is_masked_out_of_the_loss():
    tok = train_tokenizer(512)
    sp = tok.special
    script = (tok.encode("Let me compute.") + [sp("<|python_start|>")] + tok.encode("print(6*7)")
              + [sp("<|python_end|>")] + tok.encode("It is 42.") + [sp("<|assistant_end|>")])
    model = ScriptedModel(script, tok.vocab_size, sp("<|output_start|>"), sp("<|output_end|>"))
    eng = Engine(model, tok, tools={"python": Tool("python", "py", lambda code: "forty two\n")})
    prompt = tok.render_prompt([{"role": "user", "content": "What is 6*7?"}])
    out = rollout_batch(eng, [prompt], group_size=2, temperature=0, max_tokens=80)
    assert out["input_ids"].shape[0] == 2 and out["prompt_index"].tolist() == [0, 0]
    block = [sp("<|output_start|>"), *tok.encode("forty two\n"), sp("<|output_end|>")]
    for b, c in enumerate(out["completions"]):
        assert c.tool_calls[0].output == "forty two\n"
        labels, mask = out["labels"][b], out["response_mask"][b]
        reply = labels[len(prompt) - 1:len(prompt) - 1 + len(c.tokens)].tolist()
        assert reply == c.tokens  # labels carry the reply where the mask says
        # the loss sees exactly the sampled tokens: the script, without the inserted output block
        assert labels[mask].tolist() == script
        s = c.tokens.index(block[0])
        assert c.tokens[s:s + len(block)] == block
        assert not mask[len(prompt) - 1 + s:len(prompt) - 1 + s + len(block)].any()
        assert not mask[:len(prompt) - 1].any()  # prompt tokens are not trained on


def test_log_probs_line_up_with_sampled_tokens_on_a_real_model():
    """Greedy rollouts of a random model: at every unmasked position the label is the argmax of the
    model's logits at that position (so log-probs computed on these rows score the sampled tokens)."""
    model = random_model(512, seed=1)
    eng = Engine(model)  # no tokenizer: raw prompts, no tools, no stop tokens
    prompts = [[5, 17, 99, 3], [300, 2], [11, 12, 13, 14, 15, 16]]
    out = rollout_batch(eng, prompts, group_size=2, temperature=0, max_tokens=6)
    assert out["prompt_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert out["response_mask"].sum(-1).tolist() == [6] * 6  # right padding of short rows is masked
    with torch.no_grad():
        logits = model(out["input_ids"])
        lp = get_response_log_probs(model, out["input_ids"], out["labels"])["log_probs"]
    m = out["response_mask"]
    assert torch.equal(logits.argmax(-1)[m], out["labels"][m])
    assert (lp[m] > -20).all()
