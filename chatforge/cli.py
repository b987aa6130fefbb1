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
    "speedrun": (C.SpeedrunConfig, "chatforge.stages.speedrun",
                 "run every pipeline stage in order on one preset (complete stages are skipped)"),
}


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field. Defaults are SUPPRESSed so we can tell what the user typed."""
    types_ = C.field_types(cls)
    for f in dataclasses.fields(cls):
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

    data = sub.add_parser("data", help="datasets: list and download named public datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ls = dsub.add_parser("list", help="list the named datasets and whether they are in the data dir")
    ls.add_argument("--data_dir", "--data-dir", default="", help="folder to check (default: $CHATFORGE_DATA_DIR)")
    dl = dsub.add_parser("download", help="fetch a named dataset from its public origin into the data dir")
    dl.add_argument("names", nargs="+", metavar="NAME", help="dataset name(s), or 'all'")
    dl.add_argument("--data_dir", "--data-dir", default="", help="target folder (default: $CHATFORGE_DATA_DIR)")
    dl.add_argument("--mirror", default="",
                    help="base URL of a mirror laid out like the data dir (default: each file's origin)")
    dl.add_argument("--force", action="store_true", help="download again even if the file is there")
    return parser


def parse_stage_config(name: str, args: argparse.Namespace):
    cls = STAGES[name][0]
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

            if args.data_command == "list":
                datasets.print_list(args.data_dir)
            else:
                datasets.download(args.names, data_dir=args.data_dir, mirror=args.mirror, force=args.force)
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
