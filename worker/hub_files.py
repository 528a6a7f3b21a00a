"""LoRA adapter files named by Hugging Face repo id (``{"repo": ..., "weight_name": ...}``).

Only where the worker has hub access: with ``HF_HUB_OFFLINE`` set (air-gapped fleets, or a fleet
that must not reach out) such an adapter is ``invalid_input`` saying to give a URL instead. The
size is read from the hub's file listing before anything downloads, so ``MAX_LORA_BYTES`` holds
here as it does for URLs. huggingface_hub keeps its own cache under ``HF_HOME``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import requests

from handlers.errors import DownloadFailed, InvalidInput

logger = logging.getLogger(__name__)


class HubFiles:
    def __init__(
        self,
        *,
        token: str | None = None,
        offline: bool = False,
        cache_dir: str | None = None,
        endpoint: str | None = None,  # None: huggingface_hub's (HF_ENDPOINT or the public hub)
    ) -> None:
        self._token = token
        self.offline = offline
        self._cache_dir = cache_dir
        self._endpoint = endpoint

    def download(self, repo: str, filename: str, *, field: str, max_bytes: int) -> bytes:
        """The file's bytes, or ``InvalidInput`` (offline, missing, too large) / ``DownloadFailed``."""
        if self.offline:
            raise InvalidInput(
                f"{field}.repo: this worker has no Hugging Face hub access (HF_HUB_OFFLINE); "
                "give the adapter as a url instead"
            )
        # Imported here: huggingface_hub comes with the GPU stack (diffusers), not the base install.
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

        try:
            found = HfApi(token=self._token, endpoint=self._endpoint).get_paths_info(repo, [filename])
            size = getattr(found[0], "size", None) if found else None
            if size is None:
                raise InvalidInput(f"{field}.weight_name: {repo} has no file {filename}")
            if size > max_bytes:
                raise InvalidInput(
                    f"{field}: {repo}/{filename} is larger than the {max_bytes} byte download limit "
                    "(MAX_LORA_BYTES)"
                )
            path = hf_hub_download(
                repo, filename, token=self._token, cache_dir=self._cache_dir, endpoint=self._endpoint
            )
        except (RepositoryNotFoundError, EntryNotFoundError) as exc:
            # Gated and private repos the token cannot read answer like missing ones.
            raise DownloadFailed(
                f"{field}: {repo}/{filename} not found or not readable: {type(exc).__name__}", retryable=False
            ) from None
        except (HfHubHTTPError, requests.RequestException, OSError) as exc:
            raise DownloadFailed(
                f"{field}: download of {repo}/{filename} failed: {type(exc).__name__}", retryable=True
            ) from None
        logger.debug("fetched %s/%s from the hub (%d bytes)", repo, filename, size)
        return Path(path).read_bytes()
