"""Build a task from its config: the (word) arithmetic task or a real math dataset."""

from __future__ import annotations

from agpo_lab.config import TaskConfig
from agpo_lab.tasks.arithmetic import ArithmeticTask
from agpo_lab.tasks.base import Task
from agpo_lab.tasks.math_datasets import MathDatasetTask
from agpo_lab.tasks.word_arithmetic import WordArithmeticTask


def build_task(cfg: TaskConfig) -> Task:
    """The `Task` named by `cfg` (its values were checked when the config was built).

    Example: ``build_task(TaskConfig(name="arithmetic", n_train=64)).problems("train")`` gives 64
    problems.
    """
    cfg.validate()
    if cfg.name == "arithmetic":
        return ArithmeticTask(
            seed=cfg.seed, n_train=cfg.n_train, n_eval=cfg.n_eval, levels=cfg.levels
        )
    if cfg.name == "word_arithmetic":
        return WordArithmeticTask(
            seed=cfg.seed, n_train=cfg.n_train, n_eval=cfg.n_eval, levels=cfg.levels
        )
    return MathDatasetTask(cfg.name, path=cfg.path)
