"""Data tasks: the raw records, errors and parsing helpers (parsing.py), local file readers
(readers.py), the hub and the choice of source (source.py), token-level helpers (spans.py),
and the task registry with tokenized, batched splits (tasks.py)."""
from trainers.data.parsing import DataUnavailable, RawData, UnknownTask
from trainers.data.source import hub_reachable, read_raw
from trainers.data.tasks import IGNORE_INDEX, TASKS, TaskData, TaskSpec, get_task, load_task

__all__ = ["DataUnavailable", "RawData", "UnknownTask", "hub_reachable", "read_raw",
           "IGNORE_INDEX", "TASKS", "TaskData", "TaskSpec", "get_task", "load_task"]
