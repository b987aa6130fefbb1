"""A reward model: a chatforge LM backbone with a scalar head, trained on preference pairs.

    rm = RewardModel(load_checkpoint("runs/tiny/sft/checkpoint")[0])
    r = rm(ids, lengths)        # (B,) one score per row: the head read at each row's last token

The score of (conversation, reply) is a linear head on the backbone's final-norm hidden state at the
reply's last token, its <|assistant_end|>: with causal attention that is the one position that has
read the whole conversation and the whole reply (InstructGPT, https://arxiv.org/abs/2203.02155, reads
the end of the reply the same way). The backbone runs its own forward with hidden=True (one forward
path, chatforge/model.py); its lm_head is kept but unused, so the checkpoint stays an ordinary one.

Training minimises the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (losses.bradley_terry_loss)
over pairs (chatforge/pairs.py); it sees only differences, so a score means nothing on its own, only
against another reply to the same conversation.

On disk a reward model is a chatforge checkpoint (the backbone, its tokenizer) plus REWARD_HEAD_FILE,
with "reward_model": true in config.json; `load_reward_model` refuses a checkpoint without them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from chatforge.common import ChatforgeError
from chatforge.losses import bradley_terry_loss
from chatforge.pairs import batches, collate, encode_pair
from chatforge.stats import wilson_interval
from chatforge.train_loop import Checkpointer

REWARD_HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        if not backbone.config.tie_embeddings:
            # The LM head is never used here: frozen, it gets no optimizer state (which a resume expects of
            # every trainable parameter). Tied, it is the embedding and trains as such.
            backbone.lm_head.weight.requires_grad_(False)
        # Zero init: every reply scores 0 at the start, so the first loss is exactly log 2 (a check).
        self.head = nn.Linear(backbone.config.n_embd, 1, bias=False)  # a bias cancels in every difference
        nn.init.zeros_(self.head.weight)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T), lengths (B,) real tokens per row -> scores (B,) float32."""
        h = self.backbone(ids, hidden=True)  # (B, T, C)
        last = h[torch.arange(ids.size(0), device=ids.device), lengths - 1]  # (B, C)
        return self.head(last).squeeze(-1).float()  # (B,)


def rm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """loss_fn(model, batch) for train_loop.Trainer over a pairs.collate batch (B chosen rows, then B
    rejected): the Bradley-Terry loss and the batch's pairwise accuracy and mean margin."""
    r = model(batch["ids"], batch["lengths"])  # (2B,)
    B = r.size(0) // 2
    rc, rr = r[:B], r[B:]  # (B,), (B,)
    margin = (rc - rr).detach()
    return bradley_terry_loss(rc, rr), {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
                                        "n_tokens": float(batch["ids"].numel())}


@torch.no_grad()
def pair_accuracy(model: RewardModel, pairs, pad_id: int, batch_size: int = 16, device=None) -> dict:
    """Held-out pairwise accuracy (share of pairs scored chosen > rejected; a tie counts as wrong) with its
    95% Wilson interval, and the mean margin. `pairs`: EncodedPairs. Returns {"accuracy", "accuracy_low",
    "accuracy_high", "margin", "n"}."""
    was = model.training
    model.eval()
    right, margins = 0, []
    try:
        for b in batches(pairs, batch_size, pad_id):
            r = model(b["ids"].to(device), b["lengths"].to(device))  # (2B,)
            B = r.size(0) // 2
            m = r[:B] - r[B:]
            right += int((m > 0).sum())
            margins += m.tolist()
    finally:
        model.train(was)
    n = len(margins)
    lo, hi = wilson_interval(right, n)
    return {"accuracy": right / n if n else float("nan"), "accuracy_low": lo, "accuracy_high": hi,
            "margin": sum(margins) / n if n else float("nan"), "n": n}


# ----------------------------------------------------------------------------------------------
# On disk


class HeadCheckpointer(Checkpointer):
    """Saves a model made of a GPT `backbone` and a small `head` (the reward model's score head, PPO's value
    head, chatforge/ppo.py): the backbone as the checkpoint's model, so the folder loads as a plain GPT, and
    the head in `head_file` beside it. With LoRA adapters on the backbone: its merged weights, plus the
    adapters in finetune.ADAPTER_FILE so a resume is exact."""

    def __init__(self, path, head_file: str, **kw):
        super().__init__(path, **kw)
        self.head_file = head_file

    def payload(self, model):
        if hasattr(model, "backbone") and hasattr(model, "head"):
            from chatforge.finetune import ADAPTER_FILE
            from chatforge.lora import lora_modules, lora_state_dict, merged_state_dict
            from chatforge.train_loop import _FullWeights

            head = {self.head_file: model.head.state_dict()}
            if lora_modules(model.backbone):  # merged weights load as a plain backbone; adapters resume exactly
                return (_FullWeights(model.config, merged_state_dict(model.backbone)),
                        {**head, ADAPTER_FILE: lora_state_dict(model.backbone)})
            return model.backbone, head
        # FSDP's gathered weights (_FullWeights): split the flat state dict into backbone and head
        state = model.state_dict()
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        return type(model)(model.config, backbone), {self.head_file: head}


class RewardCheckpointer(HeadCheckpointer):
    """Saves the backbone as the checkpoint's model and the head in REWARD_HEAD_FILE; marks config.json."""

    def __init__(self, path, **kw):
        super().__init__(path, REWARD_HEAD_FILE, **kw)
        self.meta["reward_model"] = True


def build_reward_model(src, ckpt, *, resume: bool, lora_rank: int = 0, lora_alpha: float = 16.0, lora_targets=(),
                       seq_len: int = 0) -> tuple[RewardModel, dict | None]:
    """(reward model, resume info) to train: a new head on the backbone of checkpoint `src`, or resumed from
    `ckpt`. With lora_rank the backbone gets adapters (a resumed run: the source weights + ckpt's adapters,
    never adapters on top of ckpt's merged weights); the head always trains. seq_len longer than the
    checkpoint's context extends its RoPE tables."""
    from safetensors.torch import load_file

    from chatforge.checkpoint import load_checkpoint
    from chatforge.finetune import extend_context, load_adapters
    from chatforge.lora import apply_lora

    info = None
    if resume and not lora_rank:
        rm, info = load_reward_model(ckpt)
    else:
        rm = RewardModel(load_checkpoint(src)[0])
        if lora_rank:
            apply_lora(rm.backbone, lora_rank, lora_alpha, 0.0, lora_targets)
        if resume:
            load_adapters(rm.backbone, ckpt)
            rm.head.load_state_dict(load_file(Path(ckpt) / REWARD_HEAD_FILE))
            info = load_checkpoint(ckpt)[1]
    extend_context(rm.backbone, max(seq_len, rm.config.max_seq_len))
    return rm, info


def load_reward_model(path, device="cpu") -> tuple[RewardModel, dict]:
    """(RewardModel, info) from a reward model checkpoint; a checkpoint that is not one is a clear error."""
    from safetensors.torch import load_file

    from chatforge.checkpoint import load_checkpoint

    path = Path(path)
    backbone, info = load_checkpoint(path, device)
    head = path / REWARD_HEAD_FILE
    if not info["config"].get("reward_model") or not head.is_file():
        raise ChatforgeError(f"{path} is not a reward model checkpoint (no {REWARD_HEAD_FILE} / \"reward_model\" "
                             f"in config.json); train one with `chatforge rlhf rm`")
    rm = RewardModel(backbone)
    rm.head.load_state_dict(load_file(head, device=str(device)))
    return rm.to(device), info


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers turn every text into the same ids (ranks, specials and split pattern)."""
    return a.mergeable_ranks == b.mergeable_ranks and a.special_tokens == b.special_tokens and a.pattern == b.pattern


def check_tokenizers(rm_tok, policy_tok, rm_path, policy_path) -> None:
    """A reward model scores token ids: with another tokenizer than the policy's, its scores of the
    policy's replies would be meaningless. Stop at the start with what to do."""
    if not same_tokenizer(rm_tok, policy_tok):
        raise ChatforgeError(
            f"the reward model {rm_path} uses another tokenizer than the policy {policy_path} "
            f"(vocab {rm_tok.vocab_size:,} vs {policy_tok.vocab_size:,}"
            f"{', same size but different tokens' if rm_tok.vocab_size == policy_tok.vocab_size else ''}); "
            f"train the reward model from a checkpoint of the same run (`chatforge rlhf rm --source ...`)")


@torch.no_grad()
def score_replies(rm: RewardModel, tok, prompt: list[dict], replies: list[str], max_len: int = 0,
                  device=None) -> list[float]:
    """The reward model's score of each reply to the conversation `prompt` (messages ending with a user
    turn). Scores compare replies to the same prompt; on their own they have no unit."""
    from chatforge.tasks.preferences import PreferencePair

    max_len = max_len or rm.config.max_seq_len
    was = rm.training
    rm.eval()
    out = []
    try:
        for reply in replies:
            enc, reason = encode_pair(tok, PreferencePair("score", prompt, reply, reply), max_len)
            if enc is None:
                raise ChatforgeError(f"cannot score the reply {reply[:40]!r}: {reason} (context {max_len} tokens)")
            b = collate([enc], tok.bos_id)
            out.append(float(rm(b["ids"][:1].to(device), b["lengths"][:1].to(device))[0]))
    finally:
        rm.train(was)
    return out


def read_score_records(path) -> list[dict]:
    """The records of a `chatforge rlhf score --score_file` JSONL file."""
    import json

    try:
        return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatforgeError(f"--score_file {path}: not a readable JSONL file ({e})") from None


def score_records(path, records: list[dict], max_len: int = 0) -> list[dict]:
    """Score {prompt or messages, reply or replies} records with the reward model at `path`:
    [{"prompt": the last user message, "replies", "scores"}]. A malformed record is an error naming it."""
    from chatforge.tokenizer import Tokenizer

    rm, info = load_reward_model(path)
    if info["tokenizer_dir"] is None:
        raise ChatforgeError(f"{path} has no tokenizer/ folder")
    tok = Tokenizer.load(info["tokenizer_dir"])
    results = []
    for i, r in enumerate(records):
        msgs = (r.get("messages") or [{"role": "user", "content": r.get("prompt", "")}]) if isinstance(r, dict) else None
        replies = (r.get("replies") or [r.get("reply", "")]) if isinstance(r, dict) else None
        if not isinstance(msgs, list) or not isinstance(replies, list) or not all(isinstance(x, str) for x in replies):
            raise ChatforgeError(f"record {i + 1}: needs 'prompt' (text) or 'messages', and 'reply' or 'replies' (text)")
        replies = [x.strip() for x in replies]
        results.append({"prompt": msgs[-1].get("content", ""), "replies": replies,
                        "scores": score_replies(rm, tok, msgs, replies, max_len)})
    return results


def describe(accuracy: dict) -> str:
    """Held-out accuracy lines per source, each said to be above chance (its interval above 50%) or not."""
    return "\n".join(f"  {n:<11} {x['accuracy']:.1%} [{x['accuracy_low']:.1%}, {x['accuracy_high']:.1%}] of {x['n']} "
                     f"({'above chance' if x['accuracy_low'] > 0.5 else 'not above chance'})"
                     for n, x in accuracy.items())
