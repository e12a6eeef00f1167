"""Studies: the `reproduce` comparison repeated along one axis, then one table and figure across it.

    agpo-lab study stability          # learning rates x methods x seeds: the stability map
    agpo-lab study regime             # a weak and the shipped starting checkpoint x methods x seeds
    agpo-lab study stability --quick  # a smoke test of the same pipeline

Settings: `agpo_lab.config.StudyConfig`. Each arm (one learning rate, or one starting checkpoint)
is an ordinary `reproduce` results folder under results/<study>/<arm>/, so an arm resumes like
reproduce does and has its own table and figures; the study's files sit beside the arms:

    stability: summary.md / summary.csv (`stability.stability_table`), runs.csv (one row per run),
               stability_map.png, curves.csv (the per-step metrics the notebook draws); each
               arm's reproduce table and accuracy_vs_training_tokens.png (equal compute)
    regime:    summary.md / summary.csv (`regime.branch_summary`), mechanism.md / mechanism.csv
               (`regime.mechanism_table`), regime_curves.png, mechanism_curves.png, curves.csv,
               weak_model/ (the weak checkpoint, built on first use by `agpo-lab pretrain`)
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pandas as pd

from agpo_lab.config import PretrainConfig, ReproduceConfig, StudyConfig
from agpo_lab.errors import ConfigError
from agpo_lab.experiments import regime, stability
from agpo_lab.experiments.methods import METHODS
from agpo_lab.experiments.reproduce import reproduce
from agpo_lab.training.run_dir import write_file

CURVE_COLUMNS = (
    "reward/accuracy",
    "policy/entropy",
    "optim/grad_norm",
    "length/mean",
    "length/mean_all_wrong",
    "length/mean_all_correct",
    "length/clipped_frac",
    "end_token/prob",
    "end_token/prob_all_wrong",
    "end_token/prob_all_correct",
    "zero_var/all_wrong",
    "zero_var/all_correct",
    "rollout/tokens",
)
"""Per-step metrics kept in curves.csv (what notebook 06 draws), 4 significant digits."""
WEAK = "weak"
"""The checkpoint name that means "the embedded recipe stopped early" (built by the study)."""


def study_arms(cfg: StudyConfig, root: Path) -> dict[str, list[str]]:
    """Arm name -> the overrides that define it (applied to every run of the arm)."""
    if cfg.study == "stability":
        return {f"lr_{lr:g}": [f"optim.lr={lr}"] for lr in cfg.learning_rates}
    arms = {}
    for checkpoint in cfg.checkpoints:
        path = str(root / "weak_model") if checkpoint == WEAK else checkpoint
        arms[Path(checkpoint).name] = [f"model.name_or_path={path}"]
    return arms


def weak_checkpoint(cfg: StudyConfig, folder: Path) -> Path:
    """The weak starting checkpoint: the embedded recipe (same seed) stopped after
    cfg.weak_steps SFT steps; built once (deterministic), then reused."""
    if (folder / "config.json").is_file():
        return folder
    pretrain_cfg = PretrainConfig(
        output_dir=str(folder),
        steps=cfg.weak_steps,
        warmup_steps=min(PretrainConfig.warmup_steps, max(1, cfg.weak_steps // 10)),
        eval_problems=40 if cfg.quick else PretrainConfig.eval_problems,
    )
    from agpo_lab.experiments.pretrain import pretrain

    staging = folder.with_name(folder.name + ".partial")  # an interrupted build is never reused
    shutil.rmtree(staging, ignore_errors=True)
    pretrain_cfg = dataclasses.replace(pretrain_cfg, output_dir=str(staging))
    pretrain(pretrain_cfg, command=f"agpo-lab study regime (weak_steps={cfg.weak_steps})")
    staging.rename(folder)
    return folder


def run_study(cfg: StudyConfig, progress: bool = True) -> Path:
    """Run every arm (complete runs are skipped, others resume), then write the study's table and
    figure; return the study's folder. Unknown methods fail before anything runs."""
    cfg.validate()
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"study.methods={unknown}: unknown; valid: {', '.join(METHODS)}")
    root = Path(cfg.out_dir) / cfg.results_name
    arms = study_arms(cfg, root)
    if cfg.study == "regime" and WEAK in cfg.checkpoints:
        weak_checkpoint(cfg, root / "weak_model")
    folders = {}
    for arm, overrides in arms.items():
        arm_cfg = ReproduceConfig(
            name=arm,
            base_config=cfg.base_config,
            methods=cfg.methods,
            seeds=cfg.seeds,
            out_dir=str(root),
            jobs=cfg.jobs,
            quick=cfg.quick,
            docs=False,
            overrides=[*overrides, *cfg.overrides],
        )
        if progress:
            print(f"{cfg.study}: arm {arm} ({' '.join(overrides)})", flush=True)
        folders[arm] = reproduce(arm_cfg, progress=progress)
    write_file(root / "study.json", pd.Series(dataclasses.asdict(cfg)).to_json(indent=1).encode())
    if cfg.study == "stability":
        lrs = {lr: folders[f"lr_{lr:g}"] for lr in cfg.learning_rates}
        write_stability(root, lrs, list(cfg.methods))
    else:
        write_regime(root, folders, list(cfg.methods))
    if cfg.docs and not cfg.quick:
        docs = Path(cfg.docs_dir) / cfg.results_name
        copy_study_for_docs(root, docs, cfg.study, list(arms))
    return root


def write_stability(root: Path, arms: dict[float, Path], methods: list[str]) -> pd.DataFrame:
    """runs.csv, summary.csv / summary.md, stability_map.png and curves.csv of a stability study."""
    runs = stability.stability_runs(arms)
    table = stability.stability_table(runs, methods)
    write_file(root / "runs.csv", runs.to_csv(index=False).encode())
    write_file(root / "summary.csv", table.to_csv(index=False).encode())
    write_file(root / "summary.md", stability.stability_markdown(table).encode())
    stability.plot_stability_map(table).savefig(root / "stability_map.png", dpi=120)
    curves = regime.regime_metrics({f"{lr:g}": p for lr, p in arms.items()}, methods)
    _write_curves(root, curves.rename(columns={"arm": "lr"}))
    return table


def write_regime(root: Path, arms: dict[str, Path], methods: list[str]) -> pd.DataFrame:
    """summary.csv / summary.md (per branch), mechanism.csv / mechanism.md (final pass@1, lengths,
    truncation, p(stop) in all-wrong groups), regime_curves.png and curves.csv of a regime study."""
    metrics = regime.regime_metrics(arms, methods)
    summary = regime.branch_summary(metrics)
    write_file(root / "summary.csv", summary.to_csv(index=False).encode())
    write_file(root / "summary.md", regime.branch_markdown(summary).encode())
    mechanism = regime.mechanism_table(arms, metrics)
    write_file(root / "mechanism.csv", mechanism.to_csv(index=False).encode())
    write_file(root / "mechanism.md", regime.mechanism_markdown(mechanism).encode())
    regime.plot_regime(metrics).savefig(root / "regime_curves.png", dpi=120)
    mechanism_figure = regime.plot_regime(metrics, curves=regime.MECHANISM_CURVES)
    mechanism_figure.savefig(root / "mechanism_curves.png", dpi=120)
    _write_curves(root, metrics)
    return summary


def _write_curves(root: Path, metrics: pd.DataFrame) -> None:
    keys = [c for c in ("lr", "arm", "method", "seed", "step") if c in metrics]
    values = [c for c in CURVE_COLUMNS if c in metrics]
    text = metrics[keys + values].to_csv(index=False, float_format="%.4g")
    write_file(root / "curves.csv", text.encode())


def copy_study_for_docs(root: Path, docs: Path, study: str, arms: list[str]) -> None:
    """Copy the study's table, per-run rows, curves and figure (no checkpoints) into `docs`, and
    each arm's table and accuracy-against-sampled-tokens figure as <arm>_<file>."""
    docs.mkdir(parents=True, exist_ok=True)
    figures = (
        ("stability_map.png",)
        if study == "stability"
        else ("regime_curves.png", "mechanism_curves.png")
    )
    tables = ("summary.md", "summary.csv", "mechanism.md", "mechanism.csv", "runs.csv")
    for name in (*tables, "curves.csv", "study.json", *figures):
        if (root / name).is_file():
            shutil.copy2(root / name, docs / name)
    for arm in arms:
        for name in ("summary.md", "accuracy_vs_training_tokens.png"):
            if (root / arm / name).is_file():
                shutil.copy2(root / arm / name, docs / f"{arm}_{name}")
