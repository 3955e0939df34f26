"""Accuracy of sparse attention on real models: long-context tasks, a resumable runner, reports.

* :mod:`.tasks`: deterministic prompt generators of exact token length (passkey, needle in a
  haystack, variable tracking, perplexity) and their scores; :mod:`.haystack` and
  :mod:`.prompt` supply the text and the token-exact assembly.
* :mod:`.grid`: method variants (``xattention:threshold=0.8``) and the tasks × methods ×
  lengths × depths × seeds grid, dense always included.
* :mod:`.runner`: runs the grid on a patched model, one JSON line per finished case, resuming.
* :mod:`.report` and :mod:`.plots`: tables (score, density, speedup vs dense), the frontier
  and needle heatmap PNGs; :mod:`.show`: one layer's block mask on a real prompt.

The command line front end is ``sparse-attn eval`` / ``sparse-attn show``.
"""

from .grid import MethodVariant, build_grid
from .report import summarize, write_report
from .runner import Runner
from .tasks import TASK_NAMES, Sample, Task, get_task

__all__ = [
    "TASK_NAMES",
    "MethodVariant",
    "Runner",
    "Sample",
    "Task",
    "build_grid",
    "get_task",
    "summarize",
    "write_report",
]
