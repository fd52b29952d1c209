"""Building a dataset folder so that a reader never sees it half-written, even with several processes racing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_folder(target: Path, manifest: str, recipe: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to build into; on success write ``manifest`` and rename it into place.

    The manifest (the recipe as JSON) is written last and the rename is atomic, so ``target`` either does not
    exist or is complete. When another process renamed its own complete folder into place first, this one's
    copy is discarded. On any error the temporary folder is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        (tmp / manifest).write_text(json.dumps(recipe, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its folder is complete because it was renamed into place too.
            if not (target / manifest).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
