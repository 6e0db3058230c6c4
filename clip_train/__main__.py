"""`clip-train <command>` / `python -m clip_train <command>`: train, eval, export, report, config, make-shards, make-demo.

Bad input ends with one `clip-train: error: ...` line and exit code 2, never a deep traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from clip_train.config import ClipTrainError, ConfigError, check_paths, load_config, to_yaml


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    # force: accelerate/wandb imports may have configured the root logger already.
    logging.basicConfig(level=logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Only rank 0 reports progress: one copy of each line in a cluster log; others warn.
    logging.getLogger("clip_train").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optim.lr=1e-3 train.steps=100")


def _load(args: argparse.Namespace, training: bool = True):
    """The validated config, with inputs and the model name checked before anything heavy."""
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg, training)
    from clip_train.model import resolve_model_name  # imports torch: after the cheap checks

    resolve_model_name(cfg.model.name)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)  # before the heavy imports: a bad config fails in a second
    from clip_train.train import train

    train(cfg)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load(args, training=False)
    from clip_train.evaluate import run_eval

    run_eval(cfg, args.checkpoint, args.output)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clip_train.checkpoint import export_open_clip, load_model_weights
    from clip_train.hub import LOCAL_DIR_PREFIX, checkpoint_facts, write_model_folder
    from clip_train.model import build_model

    if args.output.endswith((".safetensors", ".json")):
        raise ConfigError(f"--output {args.output}: give a folder (it then holds open_clip_model.safetensors, "
                          "open_clip_config.json and README.md) or a .pt file (a plain state dict)")
    cfg = _load(args, training=False)
    bundle = build_model(cfg.model)
    load_model_weights(bundle.model, args.checkpoint)
    if not args.output.endswith((".pt", ".pth", ".bin")):  # a folder in open_clip's hub layout
        write_model_folder(args.output, bundle.model, model=bundle.model, tokenizer=bundle.tokenizer,
                           name=bundle.name, cfg=cfg, facts=checkpoint_facts(args.checkpoint, cfg))
        print(f"wrote {args.output}/: open_clip.create_model_and_transforms('{LOCAL_DIR_PREFIX}{args.output}') "
              f"loads it; share it with `hf upload <user>/<repo> {args.output} .`")
        return 0
    export_open_clip(bundle.model, args.output)
    print(f"wrote {args.output}: load it with open_clip.create_model_and_transforms("
          f"{bundle.name!r}, pretrained={args.output!r})"
          + (f" after open_clip.add_model_config({cfg.model.name!r})" if cfg.model.name.endswith(".json") else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from clip_train.report import write_report

    png, page = write_report(args.run_dir, args.output_dir)
    print(f"wrote {png} and {page}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        from clip_train.config_reference import render

        if args.config or args.overrides:
            raise ConfigError("config --reference: documents every key and takes no --config or overrides")
        sys.stdout.write(render())
        return 0
    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "make-shards":
        from clip_train.data import make_shards_main

        return _guarded(lambda: make_shards_main(argv[1:]))
    if argv and argv[0] == "make-demo":
        from clip_train.demo import make_demo_main

        return _guarded(lambda: make_demo_main(argv[1:]))

    args = build_parser().parse_args(argv)
    _setup_logging()
    return _guarded(lambda: args.func(args))


def build_parser() -> argparse.ArgumentParser:
    """The command line of every subcommand but make-shards and make-demo (they parse their own)."""
    parser = argparse.ArgumentParser(prog="clip-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (plain python: 1 process; accelerate launch: N)")
    _config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="zero-shot classification, retrieval and validation loss of a checkpoint")
    _config_args(p)
    p.add_argument("--checkpoint", help="training checkpoint directory, model folder (a run's model/) "
                                        "or exported open_clip file")
    p.add_argument("--output", help="results JSON (default: <train.output_dir>/eval.json)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export", help="write a model folder (open_clip's hub layout) or a plain open_clip "
                                      "state dict from a checkpoint")
    _config_args(p)
    p.add_argument("--checkpoint", required=True, help="training checkpoint directory")
    p.add_argument("--output", required=True,
                   help="a folder (open_clip_config.json, open_clip_model.safetensors, README.md: "
                        "loadable as local-dir:FOLDER) or a .pt/.pth/.bin file (a state dict)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("report", help="draw a run's curves from metrics.jsonl: report.png and report.html")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's train.output_dir (it may still be training)")
    p.add_argument("--output-dir", help="where to write report.png and report.html (default: RUN_DIR)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("config", help="print the resolved config as YAML, or (--reference) every key documented")
    _config_args(p)
    p.add_argument("--reference", action="store_true",
                   help="print the configuration reference (Markdown, docs/configuration.md) generated "
                        "from the comments in clip_train/config.py")
    p.set_defaults(func=cmd_config)
    sub.add_parser("make-shards", help="write webdataset shards from a folder or manifest (see --help)")
    sub.add_parser("make-demo", help="write the demo's handwritten-digits shards (see --help)")
    return parser


def _guarded(fn) -> int:
    try:
        return fn()
    except (ClipTrainError, FileNotFoundError) as err:
        print(f"clip-train: error: {one_line(str(err))}", file=sys.stderr, flush=True)
        return 2


def one_line(message: str) -> str:
    """The user's error without the worker traceback that torch's DataLoader wraps around it."""
    if "Original Traceback" not in message:
        return message
    where = message.splitlines()[0].removeprefix("Caught ").rstrip(".")
    last = [line for line in message.splitlines() if line.strip()][-1]
    return f"{last.split(': ', 1)[-1]} ({where})"


if __name__ == "__main__":
    sys.exit(main())
