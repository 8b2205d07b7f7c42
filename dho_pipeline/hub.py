"""Downloading weights (open_clip tags, timm tags) without hanging: the local cache first, then one short
request, then the download, and every failure one line that says how to get the file (`hf download`).

huggingface_hub brings the offline switch (HF_HUB_OFFLINE), proxies (HTTPS_PROXY) and the cache
($HF_HOME/hub); on its own it retries a missing file for minutes behind a proxy that never answers, so a
metadata request with a short timeout (HF_HUB_ETAG_TIMEOUT) goes first. Files behind a plain URL get a
short HEAD request (urllib honours HTTPS_PROXY) before the library's own download, which has no timeout.
"""

from __future__ import annotations

import os
from typing import Callable

from .errors import UserError

URL_PROBE_SECONDS = 5.0


def cached_hub_file(repo: str, candidates: list[str]) -> str | None:
    """The first of `candidates` already in the local Hugging Face cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    for candidate in candidates:
        found = try_to_load_from_cache(repo, candidate)
        if isinstance(found, str):
            return found
    return None


def how_to_get(repo: str | None, filename: str | None, url: str | None = None) -> str:
    if repo is None:
        return f"download {url} where there is network and pass --pretrained /path/to/the/file"
    return (f"run `hf download {repo} {filename}` where there is network (it fills the Hugging Face cache, "
            "$HF_HOME/hub, which is then used offline; copy that cache here), or pass --pretrained /path/to/the/file")


def proxy_note() -> str:
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    return f" through the proxy {proxy}" if proxy else ""


def short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def download_from_hub(repo: str, candidates: list[str], *, what: str, library_name: str) -> str:
    """The first of `candidates` already in the Hugging Face cache (no network), else the first that the
    repository holds, downloaded into that cache."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

    cached = cached_hub_file(repo, candidates)
    if cached:
        return cached
    how = how_to_get(repo, candidates[0])
    if constants.is_offline_mode():
        raise UserError(f"{what} are not in the Hugging Face cache and HF_HUB_OFFLINE is set: {how}")
    for filename in candidates:
        try:
            get_hf_file_metadata(hf_hub_url(repo, filename), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except RemoteEntryNotFoundError:
            continue  # repositories hold one of the candidate names
        except (RepositoryNotFoundError, GatedRepoError) as error:
            raise UserError(f"{what}: the hub refused ({short(error)}); if the repository is gated, log in with "
                            f"`hf auth login`; or {how}") from None
        except Exception as error:  # connection, proxy, timeout, TLS: httpx and huggingface_hub errors
            raise UserError(f"{what} are not cached here and the Hugging Face hub cannot be reached{proxy_note()} "
                            f"({short(error)}): {how}") from None
        try:
            return hf_hub_download(repo, filename, library_name=library_name)
        except Exception as error:
            raise UserError(f"downloading {what} failed ({short(error)}): {how}") from None
    raise UserError(f"{what}: the repository holds none of {', '.join(candidates)}; {how}")


def download_from_url(url: str, download: Callable[[], str], *, what: str) -> str:
    """`download()` (a library's own download of `url`), after one short request that the URL answers."""
    import urllib.request

    how = how_to_get(None, None, url)
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=URL_PROBE_SECONDS).close()
    except Exception as error:
        raise UserError(f"{what} ({url}) are not cached here and cannot be reached{proxy_note()} ({short(error)}): "
                        f"{how}") from None
    try:
        return download()
    except Exception as error:
        raise UserError(f"downloading {what} failed ({short(error)}): {how}") from None
