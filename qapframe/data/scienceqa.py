"""ScienceQA (Lu et al., NeurIPS 2022), the paper's benchmark: the `hf` loader with ScienceQA's columns as defaults.

The hub copy ``derek-thomas/ScienceQA`` (splits train, validation, test) has ``image`` (None for text-only
questions), ``question``, ``choices``, ``answer`` (the index of the correct choice), ``hint`` (the context) and
``subject``, ``grade``, ``topic``, ... Rows without an image are skipped by default, so the test split reads as
ScienceQA-IMG (2,017 questions). The hint goes before the question as ``Context: ...``, as LLaVA's ScienceQA
prompts put it, and ``subject`` is the question type per-type accuracy groups by. Give ``path`` to read a local
copy (a ``save_to_disk`` folder, or a folder of the hub's parquet files).
"""

from __future__ import annotations

from pydantic import Field

from qapframe.data.base import DATASETS
from qapframe.data.hf import HFColumns, HFConfig, HFLoader


class ScienceQAColumns(HFColumns):
    choices: str | None = "choices"
    context: str | None = "hint"
    type: str | None = "subject"


class ScienceQAConfig(HFConfig):
    path: str = Field("derek-thomas/ScienceQA", min_length=1, description="the hub id, or a local copy")
    # ScienceQA has no calibration split: calibrate on training questions, never on the ones evaluated.
    split_map: dict[str, str] = Field(default_factory=lambda: {"calibration": "train"},
                                      description="qapframe split -> ScienceQA's (train, validation, test)")
    columns: ScienceQAColumns = Field(default_factory=ScienceQAColumns)


@DATASETS.register("scienceqa")
class ScienceQALoader(HFLoader):
    """ScienceQA through the hf loader: multiple choice, the hint as context, image-less questions skipped."""

    Config = ScienceQAConfig
    name = "scienceqa"  # set here: the registry names a class only when it has no name, and HFLoader's is "hf"


__all__ = ["ScienceQAColumns", "ScienceQAConfig", "ScienceQALoader"]
