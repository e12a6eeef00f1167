"""`agpo-lab` command line: reproduce | train | eval | pretrain | bench.

    agpo-lab reproduce [--quick]                # the main job: GRPO vs AGPO, tables + figures
    agpo-lab train configs/embedded_agpo.yaml run.steps=20 optim.lr=3e-5
    agpo-lab train runs/agpo-seed0              # a run directory: resume it
    agpo-lab eval runs/agpo-seed0/final
    agpo-lab bench                              # list benchmarks; `agpo-lab bench NAME` runs one

Configuration mistakes print one line to stderr and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `agpo-lab` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="agpo-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="RL-train a policy from a YAML config or resume a run")
    train.add_argument("config", help="a YAML config file, or a run directory to resume")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("eval", help="evaluate a run or model (see `agpo-lab eval -h`)", add_help=False)
    sub.add_parser(
        "pretrain", help="SFT the embedded model (see `agpo-lab pretrain -h`)", add_help=False
    )
    sub.add_parser(
        "reproduce", help="GRPO vs AGPO over seeds (see `agpo-lab reproduce -h`)", add_help=False
    )
    bench = sub.add_parser("bench", help="list or run the scripts in benchmarks/")
    bench.add_argument("name", nargs="?", help="benchmark to run (file name without .py)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")

    if argv and argv[0] in ("eval", "pretrain", "reproduce"):  # they parse their own arguments
        return _delegate(argv[0], argv[1:])
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args.config, args.overrides, quiet=args.quiet)
    return _bench(args.name, args.args)


def _train(config: str, overrides: list[str], quiet: bool) -> int:
    from tqdm.auto import tqdm

    from agpo_lab.config import load_config

    try:
        path = Path(config)
        if path.is_dir():  # a run directory: continue it with its own saved config
            cfg = load_config(path / "config.yaml", [*overrides, "run.resume=true"])
            cfg.run.out_dir, cfg.run.name = str(path.parent), path.name
        else:
            cfg = load_config(path, overrides)
        from agpo_lab.trainer import Trainer

        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"agpo-lab train: {err}", file=sys.stderr)
        return 2
    bar = tqdm(total=cfg.run.steps, initial=trainer.step, disable=quiet, desc=cfg.run.name)

    def progress(step: int, metrics: dict) -> None:
        bar.update(1)
        acc, length = metrics.get("reward/accuracy"), metrics.get("length/mean")
        bar.set_postfix(acc=f"{acc:.3f}", len=f"{length:.1f}")

    trainer.train(callback=progress)
    bar.close()
    print(f"run directory: {trainer.run_dir.path}")
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    try:
        if command == "eval":
            from agpo_lab.eval_cli import eval_main as run
        elif command == "reproduce":
            from agpo_lab.reproduce import main as run
        else:
            from agpo_lab.models.pretrain import main as run
        status = run(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"agpo-lab {command}: {err}", file=sys.stderr)
        return 2
    return int(status or 0)


def _bench(name: str | None, args: list[str]) -> int:
    scripts = sorted(BENCHMARKS_DIR.glob("*.py")) if BENCHMARKS_DIR.is_dir() else []
    if name is None:
        print("benchmarks:" if scripts else f"no benchmarks found in {BENCHMARKS_DIR}")
        for script in scripts:
            doc = (
                script.read_text().split('"""')[1].strip().splitlines()[0]
                if '"""' in script.read_text()
                else ""
            )
            print(f"  {script.stem:24s} {doc}")
        return 0
    script = BENCHMARKS_DIR / f"{name.removesuffix('.py')}.py"
    if not script.is_file():
        names = ", ".join(s.stem for s in scripts) or "none"
        print(f"agpo-lab bench: no benchmark {name!r}; available: {names}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args])


if __name__ == "__main__":
    sys.exit(main())
