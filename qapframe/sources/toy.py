"""``toy``: the trained toy LLaVA shipped inside the package (see `qapframe.toy`)."""

from __future__ import annotations

from pathlib import Path

from qapframe.sources import MODEL_SOURCES


@MODEL_SOURCES.register("toy")
def toy() -> Path:
    from qapframe.toy import TOY_PATH

    return Path(TOY_PATH)
