"""``clipfusion evaluate --grid``: a grid over the options that change the diffusion maps, for about the cost
of one run. ``run.py`` runs it (:func:`evaluate_grid`), ``points.py`` names its points, ``engine.py`` holds
the models and the work the points share, ``table.py`` writes the Table-5 view."""

from clipfusion.evaluation.grid.engine import GridEngine, LatentCache
from clipfusion.evaluation.grid.points import GridPoint, build_config, grid_config_points
from clipfusion.evaluation.grid.run import DEFAULT_LATENT_MEMORY_MB, GRID_FILE, GridResult, evaluate_grid
from clipfusion.evaluation.grid.table import grid_table_markdown, write_grid_table

__all__ = [
    "DEFAULT_LATENT_MEMORY_MB",
    "GRID_FILE",
    "GridEngine",
    "GridPoint",
    "GridResult",
    "LatentCache",
    "build_config",
    "evaluate_grid",
    "grid_config_points",
    "grid_table_markdown",
    "write_grid_table",
]
