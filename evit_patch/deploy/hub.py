"""Share patched models through the Hugging Face Hub: the same two files :func:`save_pretrained` writes.

Pushing uploads a ``save_pretrained`` directory; loading a repo id downloads exactly those two
files (safetensors + JSON) into the Hugging Face cache, so nothing pickled is ever fetched or run.
``HF_HUB_OFFLINE=1`` and ``local_files_only`` read the cache alone.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

from torch import nn

from .persist import CONFIG_NAME, WEIGHTS_NAME, save_pretrained

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload EViT-patched model (evit_patch)",
    architecture: str | None = None,
    model_kwargs: dict | None = None,
) -> CommitInfo:
    """Save ``model`` with :func:`save_pretrained` and upload it to the Hub repo ``repo_id``.

    The repo is created if needed. Anyone can then call ``evit_patch.load_pretrained(repo_id)``.

    Args:
        model: a model returned by :func:`evit_patch.apply` (possibly fine-tuned).
        repo_id: ``"user/name"`` on the Hub.
        private: visibility of a newly created repo; ``None`` is the Hub's default.
        token: a Hub token; default the one ``huggingface-cli login`` stored.
        commit_message: message of the upload commit.
        architecture: as for :func:`save_pretrained`.
        model_kwargs: as for :func:`save_pretrained`.

    Returns:
        The upload's commit (its ``commit_url`` links to it).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="evit_patch_push_") as folder:
        save_pretrained(model, folder, architecture=architecture, model_kwargs=model_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
        )
