"""``python -m pytest_kvquality sweep``: the model-selection report.

A grid of models x K types x V types x rotation on/off x n_ctx, evaluated with the plugin's engine,
references and cache, plus weights x cache compounding (requantized variants of the first model
against its own f16-cache reference). Writes ``report.md``, ``sweep.json`` and, when matplotlib is
installed, ``pareto.png`` and ``positions.png``.

``data`` (what was measured, sweep.json), ``run`` (measuring it), ``report`` and ``plots`` (showing
it), ``cli`` (its arguments; ``pytest_kvquality.cli`` is the command line).
"""

from .cli import add_sweep_arguments, run_sweep
from .data import Compounding, Sweep, SweepError, SweepRow, grid, pareto_front
from .report import markdown, write_report

__all__ = ["Compounding", "Sweep", "SweepError", "SweepRow", "add_sweep_arguments", "grid", "markdown",
           "pareto_front", "run_sweep", "write_report"]
