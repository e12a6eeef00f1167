"""Tasks with verifiable answers: the embedded arithmetic task and real math datasets."""

from agpo_lab.tasks.base import CORRECT_SCORE, Problem, Task, is_correct

__all__ = ["CORRECT_SCORE", "Problem", "Task", "is_correct"]
