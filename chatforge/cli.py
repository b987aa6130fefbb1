"""`chatforge <stage>`: parse flags into a stage config and call that stage's `run(config)`.

No logic lives here: each stage's flags are generated from its dataclass (one `--field` per field,
help text and default shown), `--preset` and `--config FILE.toml` add their layers, and the stage
module is imported only when it runs, so `chatforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

from chatforge import config as C
from chatforge.common import ChatforgeError

# Top-level stage commands: name -> one-line help. A stage's config class is config.STAGE_CONFIGS[name]
# and its code the module chatforge.stages.<name>, with run(cfg).
STAGES: dict[str, str] = {
    "facts": "invent the controlled knowledge probe's fictional people; biographies of the known ones for pretraining",
    "tokenizer": "train a byte-level BPE tokenizer (rustbpe) and write its compression report",
    "pretrain": "train the base model (next-token prediction) on the tokenized corpus; torchrun for many GPUs",
    "sft": "supervised fine-tuning into a chat model (full or LoRA, replay), with held-out checks and the knowledge probe",
    "rl": "reinforcement learning on verifiable rewards (GRPO): math, arithmetic, counting, with tools; "
          "held-out pass@1 before / after",
    "rlhf": "learning from human preferences: `rm` reward model (held-out pairwise accuracy), `judge` a second one, "
            "`dpo` Direct Preference Optimization, `grpo` or `ppo` against the reward model with the judge watching for "
            "reward hacking, `score` replies with a reward model; no action = rm then dpo",
    "index": "build the search tool's full-text index (SQLite FTS5, BM25) over the data shards or given files",
    "evaluate": "score checkpoints: bits per byte, the multiple-choice suite (CORE), chat tasks and probes "
                "-> eval.json",
    "report": "write the run's report card (report.md, report.html, plots) and print it",
    "speedrun": "run every pipeline stage in order on one preset (complete stages are skipped)",
}
# Short names typed on the command line for a stage command.
ALIASES: dict[str, str] = {"eval": "evaluate"}
# Other spellings of a config field's flag ("from" is a Python keyword, so not a field name).
EXTRA_FLAGS: dict[str, list[str]] = {"from_stage": ["--from"]}
# Stage commands that take one config field as an optional positional argument.
POSITIONAL: dict[str, tuple[str, str]] = {
    "evaluate": ("source", "a stage of the run (pretrain, sft, rl, rlhf) or a checkpoint folder; "
                           "default: every stage checkpoint the run has"),
    "report": ("run", "run name (runs/<RUN>) or run folder"),
    "rlhf": ("action", "rm | judge | dpo | grpo | ppo | score | all (default: all = rm, then dpo)"),
}
# The data stage is reached through a sub-action, `chatforge data process`.
DATA_HELP = ("WARC/WET web crawls -> clean text shards, FineWeb-style (URL filter, HTML->text, language ID, "
             "quality filters, PII masking, dedup), every decision counted")


def stage_module(name: str):
    """chatforge.stages.<name>, imported only when that stage runs (keeps `chatforge --help` fast)."""
    return importlib.import_module(f"chatforge.stages.{name}")


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (except `skip`, e.g. a positional). Defaults are SUPPRESSed so
    we can tell what the user typed."""
    types_ = C.field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name in ("preset", "config"):  # given by the generic --preset/--config flags
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = types_[f.name]
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        # argparse %-formats help strings ("%(default)s"), so a literal percent sign must be doubled:
        # "97-100% of" crashed `chatforge sft --help` with a TypeError.
        help_ = f.metadata.get("help", "")
        if "(default:" not in help_:  # a help that explains its own default (data_dir) keeps it
            help_ += f" (default: {shown!s})"
        help_ = help_.replace("%", "%%")
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_)
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        flags += EXTRA_FLAGS.get(f.name, [])
        parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatforge",
        description="Build a ChatGPT-like assistant from raw web pages, end to end. "
                    "Each subcommand is one stage; artifacts go to runs/<run>/<stage>/.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_ in STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           aliases=[a for a, n in ALIASES.items() if n == name])
        p.add_argument("--preset", choices=list(C.PRESETS), help="named bundle of settings, e.g. tiny")
        p.add_argument("--config", help="TOML file with settings (flags override it)")
        if name in POSITIONAL:
            field_name, pos_help = POSITIONAL[name]
            p.add_argument(f"{field_name}_arg", nargs="?", metavar=field_name.upper(), help=pos_help)
        add_config_args(p, C.STAGE_CONFIGS[name])

    data = sub.add_parser("data", help="web data: process WARC crawls into text shards, inspect a run, "
                                       "list and download named public datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pr = dsub.add_parser("process", help=DATA_HELP, description=DATA_HELP)
    pr.add_argument("--preset", choices=list(C.PRESETS), help="named bundle of settings, e.g. tiny")
    pr.add_argument("--config", help="TOML file with settings (flags override it)")
    add_config_args(pr, C.DataConfig)
    ins = dsub.add_parser("inspect", help="print a data run's funnel and a few random kept and dropped documents")
    ins.add_argument("run_arg", metavar="RUN", help="run name (runs/<RUN>/data), run folder or data stage folder")
    ins.add_argument("-k", type=int, default=3, help="documents to show of each kind (default: 3)")
    ins.add_argument("--seed", type=int, default=0, help="which random documents (default: 0)")
    ls = dsub.add_parser("list", help="list the named datasets and whether they are in the data dir")
    ls.add_argument("--data_dir", "--data-dir", default="", help="folder to check (default: $CHATFORGE_DATA_DIR)")
    dl = dsub.add_parser("download", help="fetch a named dataset from its public origin into the data dir",
                         description=DOWNLOAD_HELP)
    dl.add_argument("names", nargs="+", metavar="NAME",
                    help="dataset name(s), 'all' (every registry dataset), or 'cc' (Common Crawl WARC files)")
    dl.add_argument("--data_dir", "--data-dir", default="", help="target folder (default: $CHATFORGE_DATA_DIR)")
    dl.add_argument("--mirror", default="",
                    help="base URL or folder of a mirror laid out like the data dir, which for 'cc' is the layout "
                         "of data.commoncrawl.org (default: each file's origin)")
    dl.add_argument("--force", action="store_true", help="download again even if the file is there")
    dl.add_argument("--crawl", default=None,
                    help="cc: the Common Crawl crawl (default: CC-MAIN-2024-22, the gpu preset's)")
    dl.add_argument("--files", type=int, default=None,
                    help="cc: how many WARC files, the first N of the crawl's warc.paths.gz; each is ~1 GB "
                         "(default: 1, the gpu preset's input; 2 = the 8xh100 preset's)")

    # Commands on a checkpoint: CHECKPOINT is positional, the other settings are flags.
    sp = sub.add_parser("sample", help=SAMPLE_HELP.split(".")[0], description=SAMPLE_HELP)
    sp.add_argument("checkpoint_arg", metavar="CHECKPOINT", help="checkpoint folder, e.g. runs/tiny/pretrain/checkpoint")
    add_config_args(sp, C.SampleConfig, skip=("checkpoint",))
    ch = sub.add_parser("chat", help="talk to a checkpoint in the terminal, with the python and search tools",
                        description="multi-turn chat with streaming output and tool calls; type /help in the chat")
    ch.add_argument("checkpoint_arg", metavar="CHECKPOINT", help="checkpoint folder, e.g. runs/tiny/sft/checkpoint")
    add_config_args(ch, C.ChatConfig, skip=("checkpoint",))
    sv = sub.add_parser("serve", help=SERVE_HELP.split(".")[0], description=SERVE_HELP)
    sv.add_argument("checkpoint_arg", metavar="CHECKPOINT", help="checkpoint folder, e.g. runs/tiny/sft/checkpoint")
    add_config_args(sv, C.ServeConfig, skip=("checkpoint",))
    ex = sub.add_parser("export", help="export a checkpoint to another format (Hugging Face transformers)")
    ex.add_argument("checkpoint_arg", metavar="CHECKPOINT", help="checkpoint folder")
    ex.add_argument("out", metavar="OUT", help="output folder")
    ex.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers Qwen3 folder (default: hf)")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="weight dtype of the export (default: float32)")
    return parser


DOWNLOAD_HELP = ("fetch named datasets from their public origins into the data dir, verified by sha256 "
                 "(`chatforge data list` names them). 'cc' fetches Common Crawl WARC files (~1 GB each): the first "
                 "--files N paths of the crawl's warc.paths.gz, stored under crawl-data/CRAWL/... in the data dir, "
                 "where the data stage reads `--inputs crawl-data/...` from instead of streaming them; checked as "
                 "complete gzip holding WARC records, an interrupted download resumes on the next run.")


SAMPLE_HELP = ("complete text with a checkpoint, streamed to the terminal. A base model (from `pretrain`) is a "
               "document completer, not an assistant: it continues the text it is given and does not follow "
               "instructions, so give it the start of a document or a few worked examples (--prompt_file) and "
               "let it continue the pattern.")


SERVE_HELP = ("serve a checkpoint over HTTP: an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
              "/v1/models) with continuous batching, and a web chat UI at /. Listens on 127.0.0.1:8000 by default.")

# Commands on a checkpoint (positional CHECKPOINT, flags from the config class; no run directory).
CHECKPOINT_COMMANDS: dict[str, type] = {"sample": C.SampleConfig, "chat": C.ChatConfig, "serve": C.ServeConfig}


def parse_stage_config(name: str, args: argparse.Namespace):
    cls = C.STAGE_CONFIGS[name]
    types_ = C.field_types(cls)
    overrides = {}
    for f in dataclasses.fields(cls):
        if f.name in ("preset", "config"):  # speedrun passes these on to every stage
            if getattr(args, f.name):
                overrides[f.name] = getattr(args, f.name)
        elif f.name in vars(args):
            overrides[f.name] = C.parse_value(types_[f.name], getattr(args, f.name), f.name)
        elif getattr(args, f"{f.name}_arg", None) and POSITIONAL.get(name, ("",))[0] == f.name:
            overrides[f.name] = getattr(args, f"{f.name}_arg")
    return C.resolve_config(cls, stage=name, preset=args.preset, config_file=args.config,
                            overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = ALIASES.get(args.command, args.command)
    try:
        if args.command == "data":
            from chatforge import datasets

            if args.data_command == "process":
                stage_module("data").run(parse_stage_config("data", args))
            elif args.data_command == "inspect":
                from chatforge.stages.data import inspect

                print(inspect(args.run_arg, k=args.k, seed=args.seed))
            elif args.data_command == "list":
                datasets.print_list(args.data_dir)
            else:
                datasets.download(args.names, data_dir=args.data_dir, mirror=args.mirror, force=args.force,
                                  crawl=args.crawl, files=args.files)
            return 0
        if args.command == "export":
            from chatforge.export import export_hf

            path = export_hf(args.checkpoint_arg, args.out, dtype=args.dtype)
            print(f"exported {args.checkpoint_arg} -> {path} (transformers.AutoModelForCausalLM.from_pretrained)")
            return 0
        if args.command in CHECKPOINT_COMMANDS:
            cls = CHECKPOINT_COMMANDS[args.command]
            types_ = C.field_types(cls)
            values = {k: C.parse_value(types_[k], v, k) for k, v in vars(args).items() if k in types_}
            stage_module(args.command).run(cls(**{**values, "checkpoint": args.checkpoint_arg}))
            return 0
        stage_module(args.command).run(parse_stage_config(args.command, args))
        return 0
    except (ChatforgeError, C.ConfigError) as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `chatforge data list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"\nchatforge {args.command}: interrupted; completed work is kept, rerun to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
