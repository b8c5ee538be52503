"""Where a saved model lives: a local directory, or a Hugging Face Hub repo fetched into the cache."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError


def resolve(
    source: str | os.PathLike,
    files: list[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local directory as is, else the Hub repo ``source`` downloaded into (or found in) the cache.

    Only ``files`` are fetched, so a repo can hold nothing that loading would execute.
    """
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    repo_id = str(source)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=files,
        )
    except HFValidationError as exc:
        raise CheckpointError(
            f"{repo_id}: no such directory, and not a Hugging Face Hub repo id ('user/name'): {exc}"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"{repo_id}: no such directory, and the Hub repo is not in the local cache while downloads are "
            f"off (HF_HUB_OFFLINE=1 or local_files_only) or the Hub is unreachable: {exc}"
        ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{repo_id}: no such directory, and the Hub refused the download: {exc}") from exc
    return Path(folder)
