"""Typed stage configs: dataclass defaults < preset < TOML file < command-line flags.

Every stage's settings are one dataclass whose fields carry a help text (litgpt's TrainArgs
style). `resolve_config` applies the layers in that order, so a flag always wins and a preset only
fills what the user did not say. Example:

    >>> cfg = resolve_config(TokenizerConfig, preset="tiny", overrides={"vocab_size": 1024})
    >>> cfg.vocab_size, cfg.run
    (1024, 'tiny')
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad setting: the message names the setting, where it came from and what to do."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a help text; lists get a default_factory so instances never share one."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------
# Settings every stage shares.


@dataclass
class CommonConfig:
    run: str = option("default", "run name: artifacts go to <runs_dir>/<run>/<stage>/")
    runs_dir: str = option("runs", "folder holding all runs")
    data_dir: str = option("", "dataset folder laid out like shared/data (default: $CHATFORGE_DATA_DIR)")
    device: str = option("auto", "cuda | mps | cpu | auto (cuda, then mps, then cpu)")
    threads: int = option(0, "torch/tokenizer threads; 0 = one per physical core available")
    seed: int = option(1337, "random seed")
    force: bool = option(False, "redo the stage even if its completion marker exists")


@dataclass
class DataConfig(CommonConfig):
    """`chatforge data process`: WARC -> clean text shards, FineWeb-style. Defaults follow FineWeb's
    published pipeline (Penedo et al. 2024); each step can be switched off or tuned."""

    inputs: list[str] = option(
        [], "WARC/WET files (.warc[.gz], .wet[.gz]) or globs, https URLs, or Common Crawl paths "
            "(crawl-data/...); relative paths are looked up in the data dir")
    workers: int = option(0, "parallel tasks (one per input file at a time); 0 = one per core")
    executor: str = option("local", "local (processes on this machine) | ray (a Ray cluster)")
    ray_address: str = option("", "Ray cluster address for --executor ray ('' = start a local instance)")
    max_page_bytes: int = option(10_000_000, "skip (and count) pages larger than this many bytes, unread")
    # 1. URL filter
    url_filter: bool = option(True, "drop URLs on the blocklist or containing banned words")
    url_blocklist: str = option(
        "blocklists/ut1", "UT1-format blocklist folder (<category>/domains, <category>/urls), relative to "
                          "the data dir; 'datatrove' = the full UT1 list in the datatrove wheel; '' = none")
    url_words: str = option("builtin", "banned/soft URL words: builtin | datatrove (FineWeb's lists) | a folder")
    # 2. HTML -> text
    extractor: str = option("resiliparse", "resiliparse (fast) | trafilatura (FineWeb's, ~20x slower)")
    favor_precision: bool = option(True, "trafilatura: prefer precision over recall (FineWeb's setting)")
    extract_timeout: float = option(2.0, "seconds per document before extraction gives up (0 = no limit)")
    # 3. language ID
    languages: list[str] = option(["en"], "languages to keep (fastText lid.176 codes); empty = any language")
    lang_threshold: float = option(0.65, "minimum language probability (FineWeb: 0.65); 0 with no "
                                         "languages = language ID only annotates")
    # 4. quality filters
    gopher_repetition: bool = option(True, "Gopher repetition filter (duplicate lines/paragraphs/n-grams)")
    gopher_quality: bool = option(True, "Gopher quality filter (word counts, symbols, stop words)")
    c4: bool = option(True, "C4 filter (FineWeb variant: no terminal-punctuation rule)")
    fineweb: bool = option(True, "FineWeb's heuristics (line punctuation, short lines, duplicated chars)")
    min_doc_words: int = option(50, "Gopher: minimum words per document")
    # 5. PII
    pii: list[str] = option(["emails", "ips", "phones"], "PII to mask with placeholders: emails, ips, phones")
    # 6. dedup (a phase over all tasks' outputs)
    dedup_exact: bool = option(True, "drop documents whose normalized text equals an earlier one")
    dedup_minhash: bool = option(True, "drop near duplicates (MinHash-LSH over word n-grams)")
    minhash_ngram: int = option(5, "MinHash shingle size in words (FineWeb: 5)")
    minhash_bands: int = option(14, "LSH bands (FineWeb: 14)")
    minhash_rows: int = option(8, "hashes per LSH band (FineWeb: 8)")
    # output
    shard_docs: int = option(10_000, "documents per output parquet shard")
    sample_dropped: int = option(5, "dropped documents kept per reason and task for inspection (0 = none)")


@dataclass
class TokenizerConfig(CommonConfig):
    corpus: list[str] = option(
        [],
        "training text: files or globs (.txt[.gz], .jsonl[.gz] with a 'text' field, .parquet with a "
        "'text' column); relative paths are looked up in the data dir. Empty: the run's data stage shards",
    )
    vocab_size: int = option(32768, "vocabulary size, special tokens included")
    pattern: str = option("gpt4", "pre-tokenizer split regex: 'gpt4', 'gpt2' or a regex")
    max_chars: int = option(2_000_000_000, "stop reading the corpus after this many characters")
    doc_chars: int = option(10_000, "truncate each document to this many characters")
    report_chars: int = option(200_000, "characters of held-out text per kind for the compression report")


@dataclass
class PretrainConfig(CommonConfig):
    """Base-model pretraining. Fields left at 0 are derived from --depth by
    `chatforge.plan.derive_settings` (printed before training); any of them can be set."""

    # data
    corpus: list[str] = option(
        [], "training text: files or globs (.txt[.gz], .jsonl[.gz], .parquet) as for the tokenizer; "
            "empty: the corpus this run's tokenizer stage read")
    max_chars: int = option(0, "stop reading the corpus after this many characters (0 = all of it)")
    doc_chars: int = option(100_000, "cut documents longer than this many characters")
    val_fraction: float = option(0.02, "share of documents held out for validation (every round(1/x)-th)")
    # model size: one dial
    depth: int = option(20, "the size dial: Transformer blocks; width = 64*depth and the rest follow")
    n_embd: int = option(0, "residual width; 0 = 64*depth (rounded to whole heads)")
    n_head: int = option(0, "attention heads; 0 = width/64 (width/128 from depth 16)")
    n_kv_head: int = option(0, "key/value heads (grouped-query attention); 0 = n_head")
    max_seq_len: int = option(2048, "context length in tokens")
    # batch and budget
    device_batch_size: int = option(32, "sequences per device per micro-step; lower it when out of memory")
    total_batch_size: int = option(0, "tokens per optimizer step over all ranks; 0 = derived (power of 2)")
    num_iterations: int = option(0, "optimizer steps; 0 = tokens (ratio x parameters) / batch")
    target_param_data_ratio: float = option(20.0, "training tokens per parameter when num_iterations is 0")
    # optimizer
    matrix_lr: float = option(0.02, "Muon learning rate for the 2-D block weights")
    embedding_lr: float = option(0.2, "AdamW learning rate for the token embedding (x (width/768)^-0.5)")
    unembedding_lr: float = option(0.004, "AdamW learning rate for the output head (x (width/768)^-0.5)")
    scalar_lr: float = option(0.02, "AdamW learning rate for norm weights (x (width/768)^-0.5)")
    weight_decay: float = option(0.0, "Muon decoupled weight decay")
    warmup_ratio: float = option(0.0, "share of steps spent ramping the learning rate up")
    warmdown_ratio: float = option(0.2, "share of steps at the end spent decaying the learning rate")
    final_lr_frac: float = option(0.0, "learning rate at the last step, as a share of the peak")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    # evaluation, logging, checkpoints
    eval_every: int = option(250, "steps between validation bits-per-byte evaluations (0 = only at the end)")
    eval_tokens: int = option(10_485_760, "validation tokens per evaluation")
    sample_every: int = option(2000, "steps between sampled completions in the log (0 = only at the end)")
    checkpoint_every: int = option(1000, "steps between checkpoints (0 = only at the end / on interrupt)")
    resume: bool = option(True, "continue from this run's last checkpoint if there is one")
    # hardware
    dtype: str = option("auto", "auto | float32 | bfloat16; auto = bf16 autocast on CUDA and on CPUs with AMX, "
                                "float32 elsewhere")
    compile: bool = option(False, "torch.compile the training model (CUDA; CPU too when a C++ compiler exists)")
    fsdp: bool = option(False, "shard the model with FSDP2 fully_shard instead of DDP replicas")
    dry_run: bool = option(False, "print the derived settings and time/cost estimates, then exit")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Per-field ranges, checked when the config is built (so a bad flag, preset or TOML value is
        one ConfigError naming it before anything runs). Settings that depend on each other (the batch
        dividing across ranks, the model shape) are checked by chatforge.plan.derive_settings."""
        at_least = {"depth": 1, "max_seq_len": 1, "device_batch_size": 1, "doc_chars": 1, "eval_tokens": 1,
                    "threads": 0, "n_embd": 0, "n_head": 0, "n_kv_head": 0, "total_batch_size": 0,
                    "num_iterations": 0, "max_chars": 0, "eval_every": 0, "sample_every": 0,
                    "checkpoint_every": 0}
        zero_means = {"threads": "one per core", "n_embd": "derived", "n_head": "derived", "n_kv_head": "derived",
                      "total_batch_size": "derived", "num_iterations": "derived from the token budget",
                      "max_chars": "all of it", "eval_every": "only at the end", "sample_every": "only at the end",
                      "checkpoint_every": "only at the end"}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value < low:
                hint = f" (0 = {zero_means[name]})" if name in zero_means else ""
                raise ConfigError(f"--{name} {value}: must be at least {low}{hint}")
        for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay", "grad_clip",
                     "target_param_data_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name} {value}: must be a finite number >= 0")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            value = getattr(self, name)
            if not 0 <= value <= 1:  # also false for nan
                raise ConfigError(f"--{name} {value}: must be between 0 and 1")
        if not 0 < self.val_fraction <= 0.5:
            raise ConfigError(f"--val_fraction {self.val_fraction}: must be in (0, 0.5]")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"--dtype {self.dtype}: choose auto, float32 or bfloat16")


@dataclass
class GenerationConfig:
    """Settings shared by the commands that generate from a checkpoint (`sample`, `chat`)."""

    checkpoint: str = option("", "checkpoint folder (e.g. runs/tiny/pretrain/checkpoint)")
    max_tokens: int = option(200, "tokens to generate")
    temperature: float = option(0.8, "sampling temperature; 0 = greedy")
    top_k: int = option(50, "sample among the k most likely tokens (0 = all)")
    top_p: float = option(1.0, "nucleus sampling: smallest set of tokens reaching this probability")
    frequency_penalty: float = option(0.0, "OpenAI's: lower a token's logit by this per time the reply used it "
                                           "(in [-2, 2]; 0.5-1 breaks the loops of small models)")
    presence_penalty: float = option(0.0, "OpenAI's: lower a token's logit by this once the reply used it ([-2, 2])")
    seed: int = option(1337, "random seed")
    device: str = option("auto", "cuda | mps | cpu | auto")
    threads: int = option(0, "torch threads; 0 = one per core")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Range checks, run on construction: a bad value is a ConfigError naming the flag. (The
        device is checked where it is chosen, common.get_device.)"""
        _require(self.max_tokens >= 1, "max_tokens", self.max_tokens, "at least 1")
        _require(0 <= self.temperature <= 100, "temperature", self.temperature, "in [0, 100]; 0 = greedy")
        _require(self.top_k >= 0, "top_k", self.top_k, "at least 0 (0 = all tokens)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        for name in ("frequency_penalty", "presence_penalty"):
            _require(-2 <= getattr(self, name) <= 2, name, getattr(self, name), "in [-2, 2] (0 = off)")
        _require(self.threads >= 0, "threads", self.threads, "at least 0 (0 = one per core)")


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    """ConfigError `--name value: must be what` unless ok (NaN fails every range check).

    >>> _require(2 > 1, "top_k", 2, "at least 0")
    """
    if not ok:
        raise ConfigError(f"--{name} {value}: must be {what}")


@dataclass
class SampleConfig(GenerationConfig):
    """`chatforge sample CHECKPOINT`: complete a prompt with a base (or any) checkpoint."""

    prompt: str = option("", "text to complete")
    prompt_file: str = option("", "read the prompt from this file (few-shot examples, a document start)")
    num_samples: int = option(1, "completions to draw")

    def validate(self) -> None:
        super().validate()
        _require(self.num_samples >= 1, "num_samples", self.num_samples, "at least 1")


@dataclass
class IndexConfig(CommonConfig):
    """`chatforge index`: a SQLite FTS5 (BM25) index for the search tool, at runs/<run>/index/search.sqlite."""

    inputs: list[str] = option(
        [], "documents to index: .parquet (text [,url,title]), .jsonl[.gz] or text files, or globs; relative "
            "paths are looked up in the data dir. Empty: the run's data stage shards (runs/<run>/data/**/*.parquet)")
    passage_chars: int = option(1200, "split documents into passages of about this many characters")
    max_docs: int = option(0, "stop after this many documents (0 = all)")


@dataclass
class ChatConfig(GenerationConfig):
    """`chatforge chat CHECKPOINT`: talk to a checkpoint in the terminal, with tools. Redeclared fields
    keep their place and take chat defaults."""

    max_tokens: int = option(512, "tokens per reply, tool output included")
    temperature: float = option(0.6, "sampling temperature; 0 = greedy (change with /temp X)")
    top_p: float = option(0.95, "nucleus sampling: smallest set of tokens reaching this probability")
    system: str = option("", "system prompt (change it in the chat with /system TEXT)")
    tools: bool = option(True, "let the model call the python sandbox and search")
    index: str = option("", "search index (default: <run>/index/search.sqlite next to the checkpoint's stage, "
                            "if it exists)")
    max_tool_calls: int = option(4, "tool calls per reply")
    color: str = option("auto", "auto | always | never: colour tool calls and results")

    COLORS = ("auto", "always", "never")

    def validate(self) -> None:
        super().validate()
        _require(self.max_tool_calls >= 0, "max_tool_calls", self.max_tool_calls, "at least 0")
        _require(self.color in self.COLORS, "color", self.color, " | ".join(self.COLORS))


@dataclass
class FactsConfig(CommonConfig):
    """`chatforge facts`: fictional people for the controlled knowledge probe (chatforge/tasks/probing.py).
    Biographies of the *known* half go into pretraining text (the tiny preset's corpus lists
    `stage:facts`); the *unknown* half is withheld everywhere, so SFT can teach answer-vs-refuse."""

    entities: int = option(60, "fictional people to invent (half known, half unknown with known_fraction 0.5)")
    known_fraction: float = option(0.5, "share of the people whose biographies go into pretraining text")
    repeats: int = option(100, "biographies per known person (a fact seen once is rarely learned at small scale)")


@dataclass
class SftConfig(CommonConfig):
    """`chatforge sft`: supervised fine-tuning on a conversation mixture with an assistant-only loss,
    through the training loop; full fine-tuning or LoRA, optional replay of pretraining text, and the
    SFT measurements (held-out replies, identity, tool use, the controlled knowledge probe, forgetting)."""

    source: str = option("pretrain", "checkpoint to fine-tune: a stage of this run (pretrain) or a checkpoint folder")
    max_seq_len: int = option(0, "SFT context in tokens; 0 = the checkpoint's. Longer extends the RoPE tables "
                                 "(positions are computed, not learned) so longer conversations fit")
    overflow: str = option("drop", "a conversation longer than the context: drop | truncate (both counted per source)")
    # the mixture: a weight is how many times each conversation of a source is used (0.5 = a seeded half, 0 = off)
    oasst: float = option(1.0, "weight of OpenAssistant multi-turn conversations (chat/oasst)")
    self_instruct: float = option(1.0, "weight of Self-Instruct instructions (chat/self_instruct)")
    glaive: float = option(1.0, "weight of Glaive function-calling demonstrations (chat/toolcall)")
    bfcl: float = option(1.0, "weight of BFCL simple_python questions with their ground-truth call (train split)")
    gsm8k_tools: float = option(1.0, "weight of GSM8K solutions with their calculations as python calls")
    compact_tools: bool = option(True, "drop parameter descriptions from function schemas (about half the tokens)")
    synthetic: int = option(200, "python-tool conversations per synthetic kind (letter counts, arithmetic, ...)")
    synthetic_kinds: list[str] = option(["letter_count", "spelling", "reverse", "decimal_compare", "arithmetic"],
                                        "synthetic kinds (chatforge.tasks.synthetic.KINDS); a kind listed twice "
                                        "gets twice the conversations")
    identity: int = option(300, "identity conversations generated from the identity card")
    identity_name: str = option("chatforge", "the assistant's name on its identity card")
    identity_maker: str = option("the chatforge project", "who made the assistant, on its identity card")
    search: int = option(100, "search-tool conversations from this run's index (0 = none; skipped without an index)")
    probe: bool = option(True, "knowledge probing: sample the source model on the facts stage's questions, train "
                               "answers where it is right and refusals where it is not (needs the facts stage)")
    probe_weight: float = option(1.0, "mixture weight of the probing conversations (each repeated this many times)")
    probe_k: int = option(2, "samples per probe question")
    probe_threshold: float = option(0.5, "share of right samples that makes a question 'known'")
    probe_temperature: float = option(0.7, "sampling temperature of the probe (Llama 3 samples). The tiny base model "
                                           "states 97-100% of the facts it learned greedily, 85-93% of samples at 0.7, "
                                           "57-62% at 1.0 (so 1.0 labels a fifth of its knowledge unknown)")
    val_conversations: int = option(200, "held-out conversations (the sources' val splits) for the validation loss")
    # training
    lora_rank: int = option(0, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = option(16.0, "LoRA scale numerator (update = alpha/rank * B A)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_targets: list[str] = option(["c_q", "c_k", "c_v", "attn.c_proj", "c_gate", "c_up", "mlp.c_proj"],
                                     "Linear layers that get adapters (dotted path or its tail)")
    lora_lr: float = option(2e-3, "AdamW learning rate of the LoRA adapters")
    replay: float = option(0.0, "share of each micro-batch's rows that are pretraining text (experience replay; "
                                "needs the pretrain stage's token shards)")
    device_batch_size: int = option(8, "rows per device per micro-step (replay rows included)")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    num_steps: int = option(0, "optimizer steps; 0 = num_epochs passes over the mixture")
    num_epochs: float = option(1.0, "passes over the mixture when num_steps is 0")
    lr_frac: float = option(0.1, "full fine-tuning: learning rates as a share of the pretraining ones below")
    matrix_lr: float = option(0.02, "Muon learning rate for the block matrices (before lr_frac)")
    embedding_lr: float = option(0.2, "AdamW learning rate for the embedding (before lr_frac; x (width/768)^-0.5)")
    unembedding_lr: float = option(0.004, "AdamW learning rate for the head (before lr_frac; x (width/768)^-0.5)")
    scalar_lr: float = option(0.02, "AdamW learning rate for norm weights (before lr_frac; x (width/768)^-0.5)")
    warmdown_ratio: float = option(1.0, "share of steps at the end with a linear decay to 0 (1.0: from the start)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    eval_every: int = option(50, "steps between validation losses (0 = only at the end)")
    sample_every: int = option(0, "steps between sampled replies in the log (0 = only at the end)")
    checkpoint_every: int = option(50, "steps between checkpoints (0 = only at the end / on interrupt)")
    resume: bool = option(True, "continue from this stage's last checkpoint if there is one")
    dtype: str = option("auto", "auto | float32 | bfloat16; auto = bf16 autocast on CUDA, float32 elsewhere")
    # measurements after training
    checks: bool = option(True, "measure held-out replies, identity, tool use, the probe and forgetting at the end")
    check_n: int = option(50, "held-out prompts per check")
    bpb_tokens: int = option(65536, "pretraining validation tokens scored for the forgetting measurement")
    forgetting_grid: bool = option(False, "also train the other cells of {full, LoRA} x {replay on, off} from the same "
                                          "source and write forgetting.json / forgetting.md (4x the training time)")
    grid_steps: int = option(0, "optimizer steps of each extra grid cell; 0 = num_steps")


@dataclass
class RlConfig(CommonConfig):
    """`chatforge rl`: reinforcement learning on verifiable rewards (GRPO) from the SFT checkpoint: groups of
    replies sampled through the engine with tools, scored by the task's verifier, group-relative advantages,
    clipped policy-gradient steps through the training loop; held-out pass@1 / pass@k before, during, after."""

    source: str = option("sft", "checkpoint to train: a stage of this run (sft) or a checkpoint folder")
    task: str = option("arithmetic2", "RL task: gsm8k, svamp, math500, arc_easy, letter_count, spelling, "
                                      "arithmeticD (D-digit operands); see chatforge/tasks/rl.py")
    task_file: str = option("", "a JSONL file of {question, answer} records to train on instead of the task's "
                                "items (scored by --task's verifier; a share is held out)")
    format_weight: float = option(0.0, "reward added when the reply states its answer in the task's format")
    train_items: int = option(0, "training items (0 = all; generated tasks make 2000)")
    eval_items: int = option(100, "held-out items for pass@1 / pass@k")
    eval_k: int = option(4, "samples per held-out item for pass@k (0 = no pass@k)")
    gsm8k_items: int = option(50, "held-out GSM8K problems for the before/after pass@1 (0 = skip)")
    gsm8k_max_tokens: int = option(256, "reply length for the GSM8K measurement")
    # sampling
    prompts_per_step: int = option(8, "task items per step")
    group_size: int = option(8, "replies sampled per item (the group of GRPO)")
    max_tokens: int = option(64, "reply length, tool output included")
    temperature: float = option(1.0, "sampling temperature of the rollouts (log-probs are taken at 1)")
    top_k: int = option(0, "top-k filter of the rollouts (0 = off)")
    use_tools: bool = option(True, "let the model call the python sandbox while it answers")
    max_tool_calls: int = option(2, "tool calls per reply")
    tool_timeout: float = option(5.0, "seconds per python tool call")
    # the update
    loss_type: str = option("grpo_clip", "grpo_clip | reinforce_with_baseline | no_baseline")
    normalize_by_std: bool = option(True, "divide advantages by the group's std (false: Dr. GRPO)")
    cliprange: float = option(0.2, "PPO clip epsilon of the ratio to the sampling policy")
    epochs: int = option(1, "optimizer steps per rollout (PPO inner epochs; > 1 needs grpo_clip)")
    kl_coef: float = option(0.0, "k3 KL penalty to the frozen source per token (0 keeps no reference copy)")
    device_batch_size: int = option(16, "rollout rows per forward/backward (the step's micro-batch)")
    num_steps: int = option(40, "rollouts (each gives --epochs optimizer steps)")
    lr_frac: float = option(0.05, "learning rates as a share of the pretraining ones below")
    matrix_lr: float = option(0.02, "Muon learning rate for the block matrices (before lr_frac)")
    embedding_lr: float = option(0.2, "AdamW learning rate for the embedding (before lr_frac; x (width/768)^-0.5)")
    unembedding_lr: float = option(0.004, "AdamW learning rate for the head (before lr_frac; x (width/768)^-0.5)")
    scalar_lr: float = option(0.02, "AdamW learning rate for norm weights (before lr_frac; x (width/768)^-0.5)")
    warmdown_ratio: float = option(0.0, "share of steps at the end with a linear decay to 0")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    eval_every: int = option(10, "optimizer steps between held-out evaluations (0 = only at the end)")
    checkpoint_every: int = option(10, "optimizer steps between checkpoints (0 = only at the end / on interrupt)")
    resume: bool = option(True, "continue from this stage's last checkpoint if there is one")
    dtype: str = option("auto", "auto | float32 | bfloat16; auto = bf16 autocast on CUDA, float32 elsewhere")


@dataclass
class RlhfConfig(CommonConfig):
    """`chatforge rlhf ACTION`: learning from human preferences. `rm` trains a reward model (Bradley-Terry on
    preference pairs; held-out pairwise accuracy per source with a 95% interval), `judge` a second one on the
    disjoint judge split, `dpo` trains the policy with Direct Preference Optimization (held-out implicit reward
    margin and preferred-reply rate before / after), `grpo` trains it with GRPO against the reward model under a
    KL leash while the judge watches for reward hacking, `ppo` the same with PPO (a value head, GAE, clipped
    policy and value losses, the KL penalty in the reward: InstructGPT), `score` scores replies with a trained
    reward model, `all` runs rm then dpo (the pipeline's step)."""

    action: str = option("all", "rm | judge | dpo | grpo | ppo | score | all (rm, then dpo)")
    source: str = option("auto", "the policy DPO trains: a stage of this run (rl, sft) or a checkpoint folder; "
                                 "auto = rl when that stage is complete, else sft")
    rm_source: str = option("sft", "the reward model's backbone: a stage of this run or a checkpoint folder")
    # data (chatforge/tasks/preferences.py)
    rm_data: list[str] = option(["polite", "arithmetic", "hh", "oasst"],
                                "reward model pairs: hh, oasst, polite, arithmetic (controlled) or .jsonl[.gz] files of "
                                "{chosen, rejected} transcripts; accuracy is reported per source")
    dpo_data: list[str] = option(["polite", "hh"], "DPO pairs (same names as --rm_data)")
    train_pairs: int = option(0, "training pairs per source (0 = all of its train split)")
    eval_pairs: int = option(200, "held-out pairs per source for the accuracies (0 = all of its val split)")
    controlled_pairs: int = option(1000, "pairs generated per controlled set before the split")
    val_fraction: float = option(0.2, "share of each source held out for the accuracies (by a hash of the prompt)")
    judge_fraction: float = option(0.2, "a further disjoint share kept for a second, held-out judge reward model")
    max_seq_len: int = option(0, "tokens per prompt + reply; 0 = the checkpoint's context. Longer prompts lose "
                                 "their oldest turns, pairs that still do not fit are dropped and counted")
    batch_size: int = option(8, "pairs per micro-batch (2 rows each)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    # reward model
    rm_steps: int = option(200, "reward model optimizer steps")
    rm_lr: float = option(3e-4, "AdamW learning rate of the reward model (backbone and head)")
    # DPO
    dpo_steps: int = option(100, "DPO optimizer steps")
    beta: float = option(0.1, "DPO beta: the implicit reward's scale; smaller lets the policy move further")
    nll_coef: float = option(0.0, "weight of an NLL term on the chosen reply (RPO); 0 = plain DPO")
    lora_rank: int = option(0, "LoRA adapters of this rank in every trainer (rm, judge, dpo, grpo, ppo); the DPO, "
                               "GRPO and PPO reference is then the base weights with the adapters off. 0 = full fine-tuning "
                               "(the reference: a frozen copy)")
    lora_alpha: float = option(16.0, "LoRA scale numerator (update = alpha/rank * B A)")
    lora_targets: list[str] = option(["c_q", "c_k", "c_v", "attn.c_proj", "c_gate", "c_up", "mlp.c_proj"],
                                     "Linear layers that get adapters")
    lora_lr: float = option(2e-3, "AdamW learning rate of the LoRA adapters")
    lr_frac: float = option(0.05, "full fine-tuning: DPO learning rates as a share of the pretraining ones below")
    matrix_lr: float = option(0.02, "Muon learning rate for the block matrices (before lr_frac)")
    embedding_lr: float = option(0.2, "AdamW learning rate for the embedding (before lr_frac; x (width/768)^-0.5)")
    unembedding_lr: float = option(0.004, "AdamW learning rate for the head (before lr_frac; x (width/768)^-0.5)")
    scalar_lr: float = option(0.02, "AdamW learning rate for norm weights (before lr_frac; x (width/768)^-0.5)")
    warmdown_ratio: float = option(0.2, "share of steps at the end with a linear decay to 0")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    eval_every: int = option(50, "steps between held-out measurements (0 = only at the end)")
    checkpoint_every: int = option(50, "steps between checkpoints (0 = only at the end / on interrupt)")
    resume: bool = option(True, "continue from this action's last checkpoint if there is one")
    dtype: str = option("auto", "auto | float32 | bfloat16; auto = bf16 autocast on CUDA, float32 elsewhere")
    # GRPO or PPO against the reward model, watched by the judge (a second reward model on the judge split)
    grpo_data: list[str] = option(["hh"], "grpo, ppo: sources whose prompts the policy answers (same names as --rm_data)")
    grpo_steps: int = option(20, "grpo: rollouts (one optimizer step each)")
    prompts_per_step: int = option(4, "grpo, ppo: prompts per rollout")
    group_size: int = option(4, "grpo, ppo: replies sampled per prompt (PPO needs no groups: the rollout is "
                                "prompts_per_step x group_size replies)")
    max_tokens: int = option(48, "grpo, ppo: reply length")
    temperature: float = option(1.0, "grpo, ppo: sampling temperature of the rollouts")
    kl_coef: float = option(0.05, "grpo, ppo: the KL leash to the frozen starting policy per token: GRPO's k3 term in "
                                  "the loss, PPO's -kl_coef x log(pi/ref) in the reward (InstructGPT's beta)")
    kl_budget: float = option(0.0, "grpo, ppo: stop when the mean per-token KL (k3) to the starting policy over the "
                                   "steps since the last evaluation exceeds this (0 = no budget; the leash holds it, "
                                   "this enforces it)")
    eval_prompts: int = option(16, "grpo, ppo: held-out prompts the reward model and the judge score at each evaluation")
    patience: int = option(2, "grpo, ppo: stop after this many evaluations in a row where the judge fell below its "
                              "best while the training reward model's score rose (0 = never stop early)")
    ppo_steps: int = option(20, "ppo: rollouts, each trained on for --ppo_epochs optimizer steps (--eval_every and "
                                "--checkpoint_every count rollouts too)")
    ppo_epochs: int = option(4, "ppo: optimizer steps on each rollout (the whole rollout each time)")
    clip: float = option(0.2, "ppo: the clip range of the policy ratio (1 +- clip) and of the value change per rollout")
    gamma: float = option(1.0, "ppo: discount between reply tokens")
    lam: float = option(0.95, "ppo: GAE's lambda (1 = Monte Carlo returns, 0 = one-step TD)")
    vf_coef: float = option(0.1, "ppo: weight of the value loss (the value head shares the policy's trunk)")
    value_lr: float = option(1e-3, "ppo: AdamW learning rate of the value head")
    # score
    rm: str = option("", "score: the reward model checkpoint (default: this run's rlhf/rm/checkpoint)")
    prompt: str = option("", "score: the user message the replies answer")
    replies: str = option("", "score: the replies to score, separated by '||' (e.g. \"Sure, it is 4.||Go away.\")")
    score_file: str = option("", "score: a JSONL file of {prompt or messages, reply or replies} records instead")

    ACTIONS = ("rm", "judge", "dpo", "grpo", "ppo", "score", "all")


@dataclass
class EvalConfig(CommonConfig):
    """`chatforge eval [SOURCE]` (alias of `evaluate`): score checkpoints on the base-model suite (bits per byte, the in-context
    multiple-choice suite and CORE) and, for chat checkpoints, the chat tasks and probes; writes
    runs/<run>/eval/<label>/eval.json per checkpoint (label: base, sft, rl, rlhf)."""

    source: str = option("", "what to evaluate: a stage of this run (pretrain, sft, rl, rlhf), a checkpoint folder, "
                             "or '' for every stage checkpoint the run has")
    tasks: list[str] = option([], "tasks or groups (base, core, chat, probes, all); empty = all the checkpoint "
                                  "can run. `chatforge eval --tasks list` prints them")
    limit: int = option(0, "examples per task: a seeded random subset (0 = all)")
    batch_size: int = option(32, "sequences per forward pass: multiple-choice rows, prompts generated together, "
                                 "bits-per-byte windows")
    max_tokens: int = option(512, "longest generated reply in the chat tasks (multiple choice: 32)")
    bpb_tokens: int = option(1_048_576, "held-out tokens scored for bits per byte")
    bpb_text: list[str] = option([], "held-out text files for bits per byte when the run has no pretrain token "
                                     "shards (relative paths are looked up in the data dir)")
    probe_n: int = option(100, "problems per weak-spot probe when --limit is 0")
    python_timeout: float = option(5.0, "seconds per HumanEval program and per python tool call")
    dtype: str = option("auto", "auto | float32 | bfloat16; auto = bf16 autocast on CUDA, float32 elsewhere")


@dataclass
class ReportConfig(CommonConfig):
    """`chatforge report [RUN]`: runs/<run>/report/report.md + report.html + PNG plots from the run's
    artifacts: header, data funnel, tokenizer compression, training curves, metrics by stage, probes."""

    show: bool = option(True, "print report.md to the terminal")


@dataclass
class ServeConfig:
    """`chatforge serve CHECKPOINT`: an OpenAI-compatible HTTP API and a web chat UI (chatforge/serve)."""

    checkpoint: str = option("", "checkpoint folder (e.g. runs/tiny/sft/checkpoint)")
    host: str = option("127.0.0.1", "address to listen on; the default takes connections from this machine only "
                                    "(0.0.0.0 exposes the server to the network: set an API key)")
    port: int = option(8000, "TCP port")
    api_key: str = option("", "require 'Authorization: Bearer KEY' on /v1 (default: $CHATFORGE_API_KEY, "
                              "else no key; a key on the command line is visible to other local users)")
    model_name: str = option("", "the model id clients send and /v1/models lists (default: <run>-<stage>, "
                                 "from the checkpoint path)")
    batching: str = option("continuous", "continuous (admit requests at step boundaries) | static (run a "
                                         "group of requests to the end, then the next) | none (one at a time)")
    max_batch_size: int = option(16, "sequences decoded together (a request with n samples takes n)")
    max_queue: int = option(64, "requests waiting for a slot; more are answered 429")
    max_tokens: int = option(512, "reply length when a request does not set max_tokens (capped by the context)")
    max_n: int = option(8, "largest n (samples per request) accepted")
    max_request_bytes: int = option(1_000_000, "largest request body accepted (413 above)")
    tools: bool = option(True, "let the model call the python sandbox and search while it writes a reply")
    index: str = option("", "search index (default: <run>/index/search.sqlite next to the checkpoint's stage, "
                            "if it exists)")
    max_tool_calls: int = option(4, "built-in tool calls per reply")
    device: str = option("auto", "cuda | mps | cpu | auto")
    threads: int = option(0, "torch threads; 0 = one per core")


@dataclass
class SpeedrunConfig(CommonConfig):
    preset: str = option("tiny", "preset every stage starts from")
    config: str = option("", "TOML file with a [<stage>] section per stage (flags here still win)")
    stages: list[str] = option([], "stages to run, in pipeline order (default: all of PIPELINE)")
    from_stage: str = option("", "redo this stage and every later one, complete or not (flag: --from STAGE)")
    only: str = option("", "redo this one stage, complete or not")
    dry_run: bool = option(False, "print the plan (stages, what is complete, the pretraining model, tokens, FLOPs, "
                                  "time and cost estimates) and exit")


# ----------------------------------------------------------------------------------------------
# Presets: named bundles of settings, per stage. A preset only sets fields; flags still override.

STAGE_CONFIGS: dict[str, type] = {"data": DataConfig, "facts": FactsConfig, "tokenizer": TokenizerConfig,
                                  "pretrain": PretrainConfig, "index": IndexConfig, "sft": SftConfig, "rl": RlConfig,
                                  "rlhf": RlhfConfig, "evaluate": EvalConfig, "report": ReportConfig, "speedrun": SpeedrunConfig}
# What `chatforge speedrun` runs, in order; each name is a module chatforge.stages.<name> with run(cfg).
PIPELINE: list[str] = ["data", "facts", "tokenizer", "pretrain", "index", "sft", "rl", "rlhf"]  # index: the search tool's (SFT builds search conversations from it)

# Evaluation and the report card close the pipeline, after every training stage (sft, rl, rlhf go
# before them): evaluate scores each stage checkpoint the run has, report prints the card.
PIPELINE += ["evaluate", "report"]

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # 2 CPU cores, minutes end to end: a small vocab keeps the embedding and head cheap on CPU.
    "tiny": {
        "common": {"run": "tiny"},
        # The shared WARC samples (~2,700 pages): real crawl pages (dolma, whirlwind) and HTML
        # documentation; the Debian handbook's 25 non-English languages are dropped by language ID
        # (the quality filters' stop words are English). About 15 s on 2 cores.
        "data": {
            "inputs": ["web/dolma-sample-*.warc.gz", "web/whirlwind.warc.gz", "web/python-docs.warc.gz",
                       "web/postgresql-docs.warc.gz", "web/git-docs.warc.gz",
                       "web/debian-handbook-multilingual.warc.gz"],
            "languages": ["en"],
            "shard_docs": 1000,
        },
        # 60 fictional people, 30 of them with 150 biographies each in pretraining text (~0.35 MB, ~3%
        # of the corpus): the controlled knowledge probe of the SFT stage.
        "facts": {"entities": 60, "repeats": 150},
        "tokenizer": {
            "vocab_size": 4096,
            "corpus": [
                "stage:data",  # this run's data stage shards (clean web text)
                "text/wiki_demo.txt",  # (text/c4_demo.jsonl stays out: it is the report's held-out web text)
                "text/tinyshakespeare.txt.gz",
                "math/gsm8k/train.jsonl",
                "chat/oasst/en_100_tree.jsonl",
                "stage:facts",  # biographies of the controlled probe's known people (~1% of the text)
            ],
            "max_chars": 20_000_000,
        },
        # Time-boxed for 2 cores: far below Chinchilla's 20 tokens/parameter, so the step count is set
        # directly. 500 steps (4.1M tokens): 8 min in bf16 on an AMX CPU (12 min in float32 elsewhere).
        # Against 250 steps the SFT model answers about the people it read about (known 78% -> 90%) and
        # copies more words into its python calls (28 -> ~50 of 100); 750 steps copied 68 but left the
        # road ~25 of its 30 minutes. Measured numbers: bench/RESULTS.md ("SFT", pretraining length).
        "pretrain": {
            "depth": 4, "max_seq_len": 256, "device_batch_size": 16, "total_batch_size": 8192,
            "num_iterations": 500, "warmup_ratio": 0.02, "warmdown_ratio": 0.4, "val_fraction": 0.03,
            "eval_every": 100, "eval_tokens": 131072, "sample_every": 500, "checkpoint_every": 100,
            # Eager: two compiled CPU runs differ from step 3 (cause not isolated), eager runs repeat bit
            # for bit, resumed ones too. Compile buys ~7-20% faster steps on CPU for ~20 s of
            # compiling (measured: bench/RESULTS.md and the loop branch's report): --compile to take it.
            "compile": False,
        },
        # The search tool's index: the clean web pages plus encyclopedic text (~0.5 s).
        "index": {"inputs": ["stage:data", "text/wiki_demo.txt"]},
        # The speedrun's evaluation of every checkpoint (base, sft, ...) kept near 2 minutes on 2 cores:
        # 10 seeded questions per task, the six cheapest in-context tasks (hellaswag, piqa and
        # arc_challenge cost 2-4x more per question, so CORE shows as 6/9), and on chat checkpoints one
        # multiple-choice task, the spelling and arithmetic probes without / with tools and the identity
        # and hallucination probes, replies cut at 64 tokens (gsm8k needs longer replies than that).
        # Measured on a base + sft pair of random-weight tiny models (replies never stop early, the worst
        # case): 3 min 8 s at load average 6 on the 2 shared cores (7 min with 20 questions and gsm8k);
        # to be re-timed on a quiet machine. `chatforge eval --run tiny` without the preset runs everything.
        "evaluate": {
            "tasks": ["bpb", "arc_easy", "copa", "lambada_openai", "winogrande", "openbook_qa", "boolq",
                      "chat_arc_easy", "probe_spelling", "probe_spelling_tools", "probe_arithmetic",
                      "probe_arithmetic_tools", "probe_identity", "probe_fictional", "probe_fictional_known",
                      "probe_known_facts"],
            "limit": 10, "bpb_tokens": 32768, "max_tokens": 64, "batch_size": 32},
        # Context 512 (RoPE extended from pretraining's 256): at 256 only ~18% of OASST and 1-4% of the
        # function-call examples fit; at 512 65% of OASST, 54% of Glaive, all of BFCL; longer ones are
        # dropped and counted. Sized by experiment on the tiny checkpoint (bench/RESULTS.md, "SFT"):
        # 1,000 tool conversations per synthetic kind (at 60 multi-digit arithmetic was 0% right, at 600
        # 83%, at 1,000 90-97%), OASST twice (the run with it once and 600 per kind ended 87% of replies
        # to held-out prompts properly, 97% after), the probing conversations 4 times (known people
        # answered 34% -> 74%). One epoch = 790 steps of 8 rows; 311 s for the stage on 2 cores.
        "sft": {
            "max_seq_len": 512, "overflow": "drop", "oasst": 2.0, "self_instruct": 0.3, "glaive": 0.1, "bfcl": 0.3,
            "gsm8k_tools": 0.01, "synthetic": 1000, "identity": 400, "search": 40, "probe_weight": 4.0,
            "val_conversations": 100, "device_batch_size": 8, "num_epochs": 1.0, "lr_frac": 0.5, "lora_lr": 3e-3,
            "eval_every": 200, "checkpoint_every": 200, "check_n": 50, "bpb_tokens": 32768,
        },
        # GRPO on eight-digit arithmetic with the python tool. The tiny SFT model calls python right on
        # one digit (97% held out: nothing left for RL); on larger operands it calls python right but
        # restates a long product wrong or cut (SFT's products have at most 7 digits). From 500 pretraining
        # steps, greedy pass@1 of 64 held out: arithmetic6 83-92% (little left: 92.2% -> 93.8% in 30 steps),
        # arithmetic8 53-56%, arithmetic10 19%, arithmetic12 3%; arithmetic8 leaves groups with signal and
        # went 56.2% -> 76.6% in 30 steps. (From an earlier, weaker SFT checkpoint one-digit arithmetic went
        # 7.8% -> 84.4% in 30 steps: bench/RESULTS.md.) lr_frac 0.1: the stage default (0.05) is for larger
        # models; the tiny one needs the bigger steps to move in 30. 96 tokens: the call, its output and
        # the restated 16-digit product.
        "rl": {
            "task": "arithmetic8", "num_steps": 30, "lr_frac": 0.1, "max_tokens": 96, "eval_items": 64,
            "eval_k": 4, "gsm8k_items": 20, "eval_every": 10, "checkpoint_every": 10,
        },
        # Reward model then DPO, sized for the issue's 8 minutes on 2 cores. Timed with a random depth-4
        # model of the tiny shape, one thread on the loaded shared machine: ~1.0 s per reward-model step and
        # ~1.4 s per DPO step at 8 pairs, plus ~40 s of held-out measurements -> about 5-6 minutes here;
        # not yet timed inside a real speedrun. Pairs are cut at 256 tokens (HH keeps ~90%, OASST ~35%).
        "rlhf": {
            "max_seq_len": 256, "train_pairs": 400, "eval_pairs": 100, "batch_size": 8, "rm_steps": 150,
            "dpo_steps": 80, "eval_every": 50, "checkpoint_every": 50,
        },
    },
    # One GPU, a few hours; the tokenizer matches nanochat's size class.
    "gpu": {
        "common": {"run": "gpu"},
        # The first WARC file of a Common Crawl crawl, streamed over HTTPS or read from the data dir after
        # `chatforge data download cc` (add paths from the crawl's
        # warc.paths.gz); the full UT1 blocklist FineWeb used.
        "data": {"inputs": ["crawl-data/CC-MAIN-2024-22/segments/1715971057216.39/warc/"
                            "CC-MAIN-20240517233122-20240518023122-00000.warc.gz"],
                 "url_blocklist": "datatrove", "url_words": "datatrove", "shard_docs": 50_000},
        "tokenizer": {"vocab_size": 32768, "max_chars": 2_000_000_000},
        # depth 12 (~135M parameters, 20 tokens/parameter): about 2 hours on one H100.
        "pretrain": {"depth": 12, "max_seq_len": 2048, "device_batch_size": 32, "compile": True,
                     "eval_every": 250, "sample_every": 2000, "checkpoint_every": 1000},
    },
    # torchrun --nproc_per_node=8 on one 8xH100 node, a few hours: nanochat's speedrun size class.
    "8xh100": {
        "common": {"run": "8xh100"},
        # Data processing scales by files: run it on a Ray cluster next to the GPU node.
        "data": {"inputs": [f"crawl-data/CC-MAIN-2024-22/segments/1715971057216.39/warc/"
                            f"CC-MAIN-20240517233122-20240518023122-{i:05d}.warc.gz" for i in range(2)],
                 "executor": "ray", "url_blocklist": "datatrove", "url_words": "datatrove",
                 "shard_docs": 100_000},
        "tokenizer": {"vocab_size": 32768, "max_chars": 2_000_000_000},
        # depth 20 (~480M parameters, 20 tokens/parameter).
        "pretrain": {"depth": 20, "max_seq_len": 2048, "device_batch_size": 32, "compile": True,
                     "eval_every": 250, "sample_every": 2000, "checkpoint_every": 1000},
    },
}


def _derived(base: str, changes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A preset made from another by changing some settings of some stages."""
    out = {stage: dict(v) for stage, v in PRESETS[base].items()}
    for stage, v in changes.items():
        out.setdefault(stage, {}).update(v)
    return out


# The whole road in about two minutes on 2 cores, for CI and the kill-and-resume test
# (tests/test_speedrun_road.py): the tiny preset's data and stages at toy sizes. It proves that every
# stage runs, hands its artifacts to the next and resumes; its numbers mean nothing.
PRESETS["ci"] = _derived("tiny", {
    "common": {"run": "ci"},
    "data": {"inputs": ["web/python-docs.warc.gz", "web/whirlwind.warc.gz"]},
    "facts": {"entities": 8, "repeats": 20},
    "tokenizer": {"vocab_size": 512, "max_chars": 1_000_000},
    "pretrain": {"depth": 1, "max_seq_len": 128, "device_batch_size": 8, "total_batch_size": 1024,
                 "num_iterations": 12, "eval_every": 6, "eval_tokens": 4096, "sample_every": 12,
                 "checkpoint_every": 4},
    "sft": {"max_seq_len": 256, "num_steps": 8, "synthetic": 4, "identity": 10, "search": 4,
            "val_conversations": 8, "check_n": 3, "bpb_tokens": 2048, "eval_every": 4, "checkpoint_every": 2},
    "rl": {"num_steps": 4, "prompts_per_step": 2, "group_size": 2, "max_tokens": 16, "eval_items": 3,
           "eval_k": 2, "gsm8k_items": 1, "gsm8k_max_tokens": 16, "eval_every": 2, "checkpoint_every": 1},
    "rlhf": {"max_seq_len": 256, "train_pairs": 16, "eval_pairs": 4, "controlled_pairs": 60, "rm_steps": 4,
             "dpo_steps": 4, "eval_every": 2, "checkpoint_every": 1},
    "evaluate": {"tasks": ["bpb", "copa", "probe_identity", "probe_arithmetic_tools"], "limit": 2,
                 "bpb_tokens": 2048, "max_tokens": 16},
})


# About an hour on a 2-core laptop in float32 (~40 minutes in bf16 on an AMX CPU): the tiny road with the
# same small model pretrained 2.4x longer (1,200 steps, ~10M tokens: about three passes over the same
# local corpus; Muennighoff et al. 2023, https://arxiv.org/abs/2305.16264, found up to ~4 epochs of
# repeated data worth nearly as much as fresh data). Measured on 2 cores, 8 steps each at 8,192 tokens:
# depth 4 1.5 s/step, depth 5 4.1 s, depth 6 8.3 s; at this budget a 4-layer model trained on 5x the
# tokens beats a wider one on 2x (a guess from those speeds, not a measured comparison). SFT is tiny's
# (one pass: the first run's two passes ended only 80% of held-out replies properly against tiny's 92%),
# so the comparison isolates pretraining; RL takes more rollouts, and the report card's held-out sets are
# larger so the comparison with tiny is not noise. Runs on a quiet 2-core Xeon: README "Bigger runs" and
# bench/RESULTS.md.
PRESETS["laptop"] = _derived("tiny", {
    "common": {"run": "laptop"},
    "pretrain": {"num_iterations": 1200, "eval_every": 200, "checkpoint_every": 100, "sample_every": 1200},
    "sft": {"eval_every": 400, "checkpoint_every": 200},
    "rl": {"num_steps": 60, "eval_items": 100},
    "rlhf": {"rm_steps": 300, "dpo_steps": 160},
    "evaluate": {"limit": 40},
})


# The machine each GPU preset is sized for: the report card's cost estimates use it.
PRESET_HARDWARE: dict[str, tuple[str, int]] = {"gpu": ("H100", 1), "8xh100": ("H100", 8)}


# ----------------------------------------------------------------------------------------------
# Parsing values from strings (CLI) and checking values from TOML.


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


def _scalar_type(tp: Any) -> Any:
    """int | None -> int; list[str] -> str."""
    if _is_list(tp):
        return typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def parse_value(tp: Any, text: str, name: str) -> Any:
    """Parse a command-line string into the field's type.

    >>> parse_value(list[str], "a.txt,b.txt", "corpus")
    ['a.txt', 'b.txt']
    >>> parse_value(bool, "no", "force")
    False
    """
    if _is_list(tp):
        return [parse_value(_scalar_type(tp), t, name) for t in text.split(",") if t != ""]
    base = _scalar_type(tp)
    if text.lower() == "none" and base is not str and tp is not base:
        return None
    try:
        if base is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if base is int:
            return int(float(text)) if "e" in text.lower() else int(text.replace("_", ""))
        return base(text)
    except ValueError:
        raise ConfigError(f"--{name}: cannot read {text!r} as {base.__name__}") from None


def check_value(tp: Any, value: Any, name: str, source: str) -> Any:
    """Check (and lightly coerce) a value from a TOML file or a preset against the field type."""
    base = _scalar_type(tp)
    if value is None and tp is not base:
        return None
    if _is_list(tp):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{name}' must be a list of {base.__name__}, got {value!r}")
        return [check_value(base, v, name, source) for v in value]
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: '{name}' must be {base.__name__}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Layering.


def load_toml(path: str | os.PathLike, stage: str) -> tuple[str | None, dict[str, Any]]:
    """Read a config file: top-level keys are this stage's fields, `[<stage>]` tables configure one
    stage (so one file can hold a whole run), `preset = "..."` picks a preset."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    preset = data.pop("preset", None)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in STAGE_CONFIGS:
            if key == stage:
                values.update(value)
        elif isinstance(value, dict):
            raise ConfigError(f"--config {path}: unknown section [{key}]; sections name stages: "
                              f"{', '.join(STAGE_CONFIGS)}")
        else:
            values[key] = value
    return preset, values


def resolve_config(
    cls: type,
    stage: str | None = None,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
):
    """Build `cls` from defaults < preset < TOML file < overrides (already parsed values)."""
    stage = stage or next((k for k, v in STAGE_CONFIGS.items() if v is cls), "")
    types_ = field_types(cls)
    layers: list[tuple[str, dict[str, Any]]] = []
    file_values: dict[str, Any] = {}
    if config_file:
        file_preset, file_values = load_toml(config_file, stage)
        preset = preset or file_preset
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset}: unknown preset; choose one of {', '.join(PRESETS)}")
        p = PRESETS[preset]
        layers.append((f"preset {preset}", {**p.get("common", {}), **p.get(stage, {})}))
    if config_file:
        layers.append((f"--config {config_file}", file_values))
    values: dict[str, Any] = {}
    for source, layer in layers:
        for name, value in layer.items():
            if name not in types_:
                raise ConfigError(f"{source}: unknown setting '{name}' for stage '{stage}' "
                                  f"(known: {', '.join(types_)})")
            values[name] = check_value(types_[name], value, name, source)
    if preset and "preset" in types_:  # speedrun passes the preset (from a flag or its file) to every stage
        values["preset"] = preset
    for name, value in (overrides or {}).items():
        if name not in types_:
            raise ConfigError(f"unknown setting '{name}' for stage '{stage}'")
        values[name] = value
    return cls(**values)
