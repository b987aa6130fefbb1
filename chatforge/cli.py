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

# stage name -> (config class, module with run(cfg), one-line help)
STAGES: dict[str, tuple[type, str, str]] = {
    "tokenizer": (C.TokenizerConfig, "chatforge.stages.tokenizer",
                  "train a byte-level BPE tokenizer (rustbpe) and write its compression report"),
    "pretrain": (C.PretrainConfig, "chatforge.stages.pretrain",
                 "train the base model (next-token prediction) on the tokenized corpus; torchrun for many GPUs"),
    "index": (C.IndexConfig, "chatforge.stages.index",
              "build the search tool's full-text index (SQLite FTS5, BM25) over the data shards or given files"),
    "speedrun": (C.SpeedrunConfig, "chatforge.stages.speedrun",
                 "run every pipeline stage in order on one preset (complete stages are skipped)"),
}


# Stages reached through a sub-action (`chatforge data process`) rather than a top-level command.
SUB_STAGES: dict[str, tuple[type, str, str]] = {
    "data": (C.DataConfig, "chatforge.stages.data",
             "WARC/WET web crawls -> clean text shards, FineWeb-style (URL filter, HTML->text, language ID, "
             "quality filters, PII masking, dedup), every decision counted"),
}


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
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                      help=f"{f.metadata.get('help', '')} (default: {shown!s})")
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatforge",
        description="Build a ChatGPT-like assistant from raw web pages, end to end. "
                    "Each subcommand is one stage; artifacts go to runs/<run>/<stage>/.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, _, help_) in STAGES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--preset", choices=list(C.PRESETS), help="named bundle of settings, e.g. tiny")
        p.add_argument("--config", help="TOML file with settings (flags override it)")
        add_config_args(p, cls)

    data = sub.add_parser("data", help="web data: process WARC crawls into text shards, inspect a run, "
                                       "list and download named public datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pr = dsub.add_parser("process", help=SUB_STAGES["data"][2], description=SUB_STAGES["data"][2])
    pr.add_argument("--preset", choices=list(C.PRESETS), help="named bundle of settings, e.g. tiny")
    pr.add_argument("--config", help="TOML file with settings (flags override it)")
    add_config_args(pr, C.DataConfig)
    ins = dsub.add_parser("inspect", help="print a data run's funnel and a few random kept and dropped documents")
    ins.add_argument("run_arg", metavar="RUN", help="run name (runs/<RUN>/data), run folder or data stage folder")
    ins.add_argument("-k", type=int, default=3, help="documents to show of each kind (default: 3)")
    ins.add_argument("--seed", type=int, default=0, help="which random documents (default: 0)")
    ls = dsub.add_parser("list", help="list the named datasets and whether they are in the data dir")
    ls.add_argument("--data_dir", "--data-dir", default="", help="folder to check (default: $CHATFORGE_DATA_DIR)")
    dl = dsub.add_parser("download", help="fetch a named dataset from its public origin into the data dir")
    dl.add_argument("names", nargs="+", metavar="NAME", help="dataset name(s), or 'all'")
    dl.add_argument("--data_dir", "--data-dir", default="", help="target folder (default: $CHATFORGE_DATA_DIR)")
    dl.add_argument("--mirror", default="",
                    help="base URL of a mirror laid out like the data dir (default: each file's origin)")
    dl.add_argument("--force", action="store_true", help="download again even if the file is there")

    # Commands on a checkpoint: CHECKPOINT is positional, the other settings are flags.
    sp = sub.add_parser("sample", help=SAMPLE_HELP.split(".")[0], description=SAMPLE_HELP)
    sp.add_argument("checkpoint_arg", metavar="CHECKPOINT", help="checkpoint folder, e.g. runs/tiny/pretrain/checkpoint")
    add_config_args(sp, C.SampleConfig, skip=("checkpoint",))
    ch = sub.add_parser("chat", help="talk to a checkpoint in the terminal, with the python and search tools",
                        description="multi-turn chat with streaming output and tool calls; type /help in the chat")
    ch.add_argument("checkpoint_arg", metavar="CHECKPOINT", help="checkpoint folder, e.g. runs/tiny/sft/checkpoint")
    add_config_args(ch, C.ChatConfig, skip=("checkpoint",))
    ex = sub.add_parser("export", help="export a checkpoint to another format (Hugging Face transformers)")
    ex.add_argument("checkpoint_arg", metavar="CHECKPOINT", help="checkpoint folder")
    ex.add_argument("out", metavar="OUT", help="output folder")
    ex.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers Qwen3 folder (default: hf)")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="weight dtype of the export (default: float32)")
    return parser


SAMPLE_HELP = ("complete text with a checkpoint, streamed to the terminal. A base model (from `pretrain`) is a "
               "document completer, not an assistant: it continues the text it is given and does not follow "
               "instructions, so give it the start of a document or a few worked examples (--prompt_file) and "
               "let it continue the pattern.")


# Commands on a checkpoint (positional CHECKPOINT, flags from the config class; no run directory).
CHECKPOINT_COMMANDS: dict[str, tuple[type, str]] = {
    "sample": (C.SampleConfig, "chatforge.stages.sample"),
    "chat": (C.ChatConfig, "chatforge.stages.chat"),
}


def parse_stage_config(name: str, args: argparse.Namespace):
    cls = {**STAGES, **SUB_STAGES}[name][0]
    types_ = C.field_types(cls)
    overrides = {}
    for f in dataclasses.fields(cls):
        if f.name in ("preset", "config"):  # speedrun passes these on to every stage
            if getattr(args, f.name):
                overrides[f.name] = getattr(args, f.name)
        elif f.name in vars(args):
            overrides[f.name] = C.parse_value(types_[f.name], getattr(args, f.name), f.name)
    return C.resolve_config(cls, stage=name, preset=args.preset, config_file=args.config,
                            overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "data":
            from chatforge import datasets

            if args.data_command == "process":
                importlib.import_module(SUB_STAGES["data"][1]).run(parse_stage_config("data", args))
            elif args.data_command == "inspect":
                from chatforge.stages.data import inspect

                print(inspect(args.run_arg, k=args.k, seed=args.seed))
            elif args.data_command == "list":
                datasets.print_list(args.data_dir)
            else:
                datasets.download(args.names, data_dir=args.data_dir, mirror=args.mirror, force=args.force)
            return 0
        if args.command == "export":
            from chatforge.export import export_hf

            path = export_hf(args.checkpoint_arg, args.out, dtype=args.dtype)
            print(f"exported {args.checkpoint_arg} -> {path} (transformers.AutoModelForCausalLM.from_pretrained)")
            return 0
        if args.command in CHECKPOINT_COMMANDS:
            cls, module_name = CHECKPOINT_COMMANDS[args.command]
            types_ = C.field_types(cls)
            values = {k: C.parse_value(types_[k], v, k) for k, v in vars(args).items() if k in types_}
            importlib.import_module(module_name).run(cls(**{**values, "checkpoint": args.checkpoint_arg}))
            return 0
        cfg = parse_stage_config(args.command, args)
        module = importlib.import_module(STAGES[args.command][1])
        module.run(cfg)
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
