"""A hub checkpoint that is neither cached nor reachable fails in seconds, in one line.

Left to itself, `from_pretrained` on a machine that cannot reach the hub retries every request five times
with backoff (20-30 s and about 23 warning lines per file) before it says the file is missing. Here the
local cache is read first; only when a file is not cached is the hub asked, once, with a short connect
timeout. When the hub does not answer, a cached model is read from the cache with the process switched to
offline mode (so later requests do not retry either), and a model that is not cached is one ConfigError line
saying how to download it.
"""

from __future__ import annotations

import logging
import os
from functools import cache

from clse_exp.config import looks_local
from clse_exp.errors import ConfigError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0  # one probe of the endpoint: a refused or unresolvable host answers at once


def cached_file(repo_id: str, filename: str = "config.json") -> str | None:
    """The path of `filename` of `repo_id` in the local Hugging Face cache, or None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id: nothing of it can be cached
        return None
    return found if isinstance(found, str) else None


@cache
def hub_unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached (one probe, no retries), or None when it answers at all."""
    import httpx

    try:
        httpx.head(endpoint, timeout=httpx.Timeout(CONNECT_TIMEOUT_S * 2, connect=CONNECT_TIMEOUT_S),
                   follow_redirects=False)
    except httpx.HTTPError as err:  # connection refused, no DNS, timeout: any HTTP answer means reachable
        return " ".join(str(err).split())[:120] or type(err).__name__
    return None


def go_offline() -> None:
    """Read everything from the local cache from now on (this process and the ones it starts)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def download_hint(repo_id: str) -> str:
    return (f"download it where the hub is reachable (`hf download {repo_id}`, into this cache or a shared HF_HOME) "
            "or set model.path to a local directory")


def ensure_available(path: str, key: str = "model.path") -> None:
    """Refuse in one line, within seconds, a hub id whose files can be neither read from the cache nor
    downloaded; a local directory or a cached id passes (checked by reading config.json's cache entry)."""
    from huggingface_hub import constants

    if looks_local(path):
        return
    cached = cached_file(path) is not None
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ConfigError(f"{key}={path!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                              f"HF_HUB_OFFLINE is set; {download_hint(path)}")
        return
    reason = hub_unreachable(constants.ENDPOINT)
    if reason is None:
        return
    if cached:
        log.warning("the hub (%s) is unreachable (%s): reading %s from the local cache (offline mode)",
                    constants.ENDPOINT, reason, path)
        go_offline()
        return
    raise ConfigError(f"{key}={path!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
                      f"({constants.ENDPOINT}) is unreachable ({reason}); {download_hint(path)}")
