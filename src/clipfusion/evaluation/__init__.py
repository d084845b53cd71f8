"""The benchmark protocol (``protocol.py``) and its result files (``results.py``)."""

from clipfusion.evaluation.protocol import check_dataset, evaluate, run_plan
from clipfusion.evaluation.results import (
    CSV_COLUMNS,
    METRIC_COLUMNS,
    ResultStore,
    RunKey,
    results_csv,
    summary_markdown,
)

__all__ = [
    "CSV_COLUMNS",
    "METRIC_COLUMNS",
    "ResultStore",
    "RunKey",
    "check_dataset",
    "evaluate",
    "results_csv",
    "run_plan",
    "summary_markdown",
]
