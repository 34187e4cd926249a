"""Deployable output: compressed-tensors checkpoints (`export`) that transformers and vLLM read, and `load`.

(Named ``deploy`` rather than ``export`` so that ``qapframe.export`` is the function, not this package.)

``qapframe.export(model, dir)`` / ``qapframe export SPEC --out DIR`` write the directory; ``qapframe.load(dir)``
returns the model with quantization and token pruning installed. Needs the ``export`` extra
(``pip install "qapframe[export]"``, i.e. compressed-tensors) to load; writing needs only safetensors.
"""

from qapframe.deploy.checkpoint import export
from qapframe.deploy.loading import load
from qapframe.deploy.manifest import PIPELINE_FILE, PIPELINE_FORMAT
from qapframe.deploy.scheme import ExportError

__all__ = ["ExportError", "PIPELINE_FILE", "PIPELINE_FORMAT", "export", "load"]

