"""Task files (``envs/*.toml``) and the runner behind ``sb3-rlhf train``."""

from sb3_rlhf.tasks.config import TaskConfig, load_task, parse_task
from sb3_rlhf.tasks.run import evaluate_task, run_task

__all__ = ["TaskConfig", "evaluate_task", "load_task", "parse_task", "run_task"]
