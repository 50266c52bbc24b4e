"""Reference trainer for RLSD / GRPO / OPSD on a built-in verifiable task (console script ``rlsd-train``)."""
from .tasks import TASKS, AdditionTask, Problem, Task, make_task
from .config import METHODS, TrainConfig, lam_at
from .trainer import Trainer, train

__all__ = ["Task", "Problem", "AdditionTask", "TASKS", "make_task", "TrainConfig", "Trainer", "train", "lam_at",
           "METHODS"]
