"""Batch inference past one machine, on Ray Data: ``clipfusion predict --fitted DIR --engine ray`` and
:func:`predict`.

The pipeline: input paths (files, folders, or ``.txt``/``.csv``/``.parquet`` lists; :mod:`.inputs`) →
Ray Data blocks of one batch each → ``map_batches`` on a pool of actors (:class:`.worker.ScoreBatch`), each
loading the fitted detector once, reading its batch's images with clipfusion's own loader and writing the
maps, masks (and per-image overlays) straight into the output folder, atomically → one small record per
image back to the driver, which keeps them in Parquet parts for ``--resume`` (:mod:`.records`) → with the
default set-wide colour scale, a second, model-free pass draws the overlays → ``scores.csv``,
``scores.parquet``, ``skipped.csv``, ``config.json``, ``thresholds.json``, ``report.html``,
``manifest.json``.

A worker that dies is restarted and its batch retried (Ray's ``max_restarts`` / ``max_task_retries``);
every output file is written atomically, so the outputs equal those of an uninterrupted run.

Ray is an optional dependency (``pip install 'clipfusion[ray]'``): importing this package does not import
it, and nothing else in clipfusion imports this package unless ``--engine ray`` is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipfusion.distributed.line import predict_line
    from clipfusion.distributed.run import RunSummary, predict

__all__ = ["RunSummary", "predict", "predict_line"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        try:
            from clipfusion.distributed import line, run
        except ImportError as exc:  # pyarrow comes with the extra
            from clipfusion.errors import ConfigError

            raise ConfigError(
                f"the Ray engine needs Ray Data ({exc}); pip install 'clipfusion[ray]'"
            ) from exc
        return getattr(line if name == "predict_line" else run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
