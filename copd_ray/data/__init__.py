"""Capability datasets: prompt records, loading from files, templates and synthetic tasks."""

from copd_ray.data.loading import DataError, LoadReport, load_records
from copd_ray.data.records import PromptRecord
from copd_ray.data.synthetic import TASKS, heldout_set, training_stream
from copd_ray.data.templates import encode_prompt, prompt_ids, prompt_messages

__all__ = [
    "DataError", "LoadReport", "PromptRecord", "TASKS", "encode_prompt", "heldout_set", "load_records",
    "prompt_ids", "prompt_messages", "training_stream",
]
