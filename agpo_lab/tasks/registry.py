"""Build a task from its config: the embedded arithmetic task or a real math dataset."""

from __future__ import annotations

from dataclasses import dataclass

from agpo_lab.tasks.base import Task

DATASET_TASKS = ("gsm8k", "math500", "aime24", "amc23")
TASK_NAMES = ("arithmetic", *DATASET_TASKS)


@dataclass
class TaskConfig:
    """Which problems the policy trains and is evaluated on."""

    name: str = "arithmetic"
    """Task name: "arithmetic" (embedded, offline) or a dataset: gsm8k, math500, aime24, amc23."""
    path: str | None = None
    """Local data file or folder for a dataset task (None: the task's default location)."""
    seed: int = 0
    """Seed of the embedded task's problem generator (which problems exist, not their order)."""
    n_train: int = 1000
    """Embedded task: number of training problems."""
    n_eval: int = 200
    """Embedded task: number of held-out problems."""
    levels: list[int] | None = None
    """Embedded task: difficulty levels to draw from (None: all levels)."""
    train_split: str = "train"
    """Split the RL prompts are drawn from."""
    eval_split: str = "eval"
    """Held-out split used by periodic evaluation ("eval"; datasets may call it "test")."""

    def validate(self) -> None:
        """Raise a one-line ValueError for an impossible setting."""
        if self.name not in TASK_NAMES:
            raise ValueError(f"task.name={self.name!r} is unknown; valid: {', '.join(TASK_NAMES)}")
        if self.n_train < 1 or self.n_eval < 1:
            raise ValueError("task.n_train and task.n_eval must be >= 1")


def build_task(cfg: TaskConfig) -> Task:
    """The `Task` named by `cfg` (imports dataset code only when a dataset task is asked for).

    Example: ``build_task(TaskConfig(name="arithmetic", n_train=64)).problems("train")`` gives 64
    problems.
    """
    cfg.validate()
    if cfg.name == "arithmetic":
        from agpo_lab.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask(
            seed=cfg.seed, n_train=cfg.n_train, n_eval=cfg.n_eval, levels=cfg.levels
        )
    from agpo_lab.tasks.math_datasets import MathDatasetTask

    return MathDatasetTask(cfg.name, path=cfg.path)
