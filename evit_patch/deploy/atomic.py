"""Write-then-rename: a file is either its old self or completely new, never torn by a kill.

``tempfile`` creates files 0600 and folders 0700 whatever the umask; what is renamed into place
gets the mode a plain ``open``/``mkdir`` would have given it, so a serving account can read it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file in the same directory, then rename: never a torn file.

    The file ends with mode ``0o666 & ~umask``, as ``open(path, "w")`` would create it.
    """
    # The temporary name ends like the final one (torch.export.save warns about a name without .pt2).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_temporary_dir(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` with the mode ``mkdir`` would give (``0o777 & ~umask``), for renaming into place."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(folder, 0o777 & ~umask())
    return folder
