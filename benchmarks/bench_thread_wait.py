"""How torch's OpenMP threads wait, idle and beside other work: the figures behind "Threads on a
busy machine" in docs/environment.md.

    python benchmarks/bench_thread_wait.py                 # on the machine as it is
    python benchmarks/bench_thread_wait.py --busy 4        # with `stress-ng --cpu 4` beside it

Each setting runs in a fresh process (libgomp reads its variables once, when torch loads), in
turn, on the embedded model: the mean seconds of an AGPO step (configs/embedded_agpo.yaml) and
the seconds to sample k = 8 completions for a few held-out problems per level (notebook 01's
sampling call). Printed with the ratio to the default spin measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {"GOMP_SPINCOUNT": None},
    "spin 30000": {"GOMP_SPINCOUNT": "30000"},
    "spin 10000": {"GOMP_SPINCOUNT": "10000"},
    "spin 1000": {"GOMP_SPINCOUNT": "1000"},
    "passive": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "passive"},
    "1 thread": {"GOMP_SPINCOUNT": None, "OMP_NUM_THREADS": "1"},
}
"""Name -> environment (None: unset, libgomp's default; agpo_lab would otherwise set its own)."""


def worker(steps: int, per_level: int) -> dict[str, float]:
    """The two timings, in this process (its environment is the setting)."""
    if not os.environ.get("GOMP_SPINCOUNT"):  # "": libgomp's default, so torch loads first
        os.environ.pop("GOMP_SPINCOUNT", None)
        import torch  # noqa: F401 (before agpo_lab, which would set its own spin)
    from agpo_lab.config import EvalConfig, ModelConfig, load_config
    from agpo_lab.evaluation import evaluate_records
    from agpo_lab.models.loading import load_policy
    from agpo_lab.tasks.arithmetic import LEVELS, ArithmeticTask
    from agpo_lab.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        overrides = [f"run.steps={steps}", "run.eval_at_start=false", "run.eval_every=0",
                     "run.save_every=0", "run.log_samples_every=0", f"run.out_dir={out}"]  # fmt: skip
        trainer = Trainer(load_config(REPO_ROOT / "configs" / "embedded_agpo.yaml", overrides))
        seconds = []
        trainer.train(callback=lambda step, m: seconds.append(m["perf/step_seconds"]))
    model, tokenizer = load_policy(ModelConfig(name_or_path="embedded"), "cpu")
    task = ArithmeticTask(seed=0)
    problems = [p for level in LEVELS for p in
                [q for q in task.problems("eval") if q.difficulty == level][:per_level]]  # fmt: skip
    config = EvalConfig(k=8, greedy=False, temperature=1.0, max_new_tokens=96, batch_size=128,
                        seed=0, progress=False)  # fmt: skip
    started = time.perf_counter()
    evaluate_records(model, tokenizer, task, problems, config)
    return {
        "step_s": sum(seconds) / len(seconds),
        "sampling_s": time.perf_counter() - started,
        "threads": sys.modules["torch"].get_num_threads(),
    }


def run_setting(env: dict[str, str | None], steps: int, per_level: int) -> dict[str, float]:
    environment = {k: v for k, v in os.environ.items() if k not in env}
    environment.update({k: v for k, v in env.items() if v is not None})
    environment["GOMP_SPINCOUNT"] = environment.get("GOMP_SPINCOUNT", "")  # "" = unset
    command = [sys.executable, __file__, "--worker", "--steps", str(steps),
               "--per-level", str(per_level)]  # fmt: skip
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="AGPO steps (their mean is shown)")
    parser.add_argument("--per-level", type=int, default=10, help="held-out problems per level")
    parser.add_argument("--busy", type=int, default=0,
                        help="run `stress-ng --cpu N` beside the measurements (0: none)")  # fmt: skip
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.per_level)))
        return
    stress = None
    if args.busy:
        if shutil.which("stress-ng") is None:
            raise SystemExit(
                "bench_thread_wait: --busy needs stress-ng (apt-get install stress-ng)"
            )
        stress = subprocess.Popen(["stress-ng", "--cpu", str(args.busy), "--quiet"])
        time.sleep(10)  # the load settles
    try:
        results = {name: run_setting(SETTINGS[name], args.steps, args.per_level)
                   for name in args.settings}  # fmt: skip
    finally:
        if stress is not None:
            stress.terminate()
    load = os.getloadavg()[0]
    print(f"embedded model, {args.steps} AGPO steps and {args.per_level} problems per level x k=8; "
          f"stress-ng --cpu {args.busy} beside it; load average {load:.1f} at the end")  # fmt: skip
    base = results.get("default")
    print(f"{'setting':<12} {'threads':>7} {'step s':>8} {'sampling s':>11}"
          + ("  ratio to default (step, sampling)" if base else ""))  # fmt: skip
    for name, r in results.items():
        line = f"{name:<12} {r['threads']:>7} {r['step_s']:>8.2f} {r['sampling_s']:>11.2f}"
        if base:
            step, sampling = r["step_s"] / base["step_s"], r["sampling_s"] / base["sampling_s"]
            line += f"  {step:.2f}x, {sampling:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
