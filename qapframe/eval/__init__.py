"""Evaluation: `run_spec` (what `qapframe run` calls), metrics, the results file and reports."""

from qapframe.eval.results import ResultsFile
from qapframe.eval.runner import RunSummary, run_spec

__all__ = ["ResultsFile", "RunSummary", "run_spec"]
