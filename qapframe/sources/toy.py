"""``toy``: the trained toy LLaVA shipped inside the package (see `qapframe.toy`)."""

from __future__ import annotations

from pathlib import Path

from qapframe.sources import MODEL_SOURCES


@MODEL_SOURCES.register("toy")
def toy() -> Path:
    """The trained toy LLaVA inside the installed package (2.7 M parameters, 64 vision tokens an image)."""
    from qapframe.toy import TOY_PATH

    return Path(TOY_PATH)
