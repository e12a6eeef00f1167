"""Tasks with verifiable answers: the embedded arithmetic task and real math datasets."""

from agpo_lab.tasks.base import Problem, Task

__all__ = ["Problem", "Task"]
