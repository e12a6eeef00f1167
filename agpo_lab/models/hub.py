"""Whether the Hugging Face hub can be reached, decided within a few seconds.

Offline, huggingface_hub's own retries take much longer before failing; loading and fetching ask
here first and fall back (to the HF cache, to a package registry) at once.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

HUB_TIMEOUT_S = 3.0
"""Seconds the hub gets to accept a connection before it counts as unreachable."""


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT, default huggingface.co) accepts a connection.

    False under HF_HUB_OFFLINE; True when a proxy is set for the endpoint's scheme (only the
    download itself can tell then). The DNS lookup runs in a thread because it has no timeout.
    """
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    proxies = (f"{endpoint.scheme}_proxy", "all_proxy")
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in proxies):
        return True
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    pool = ThreadPoolExecutor(max_workers=1)
    attempt = pool.submit(socket.create_connection, (endpoint.hostname, port), timeout_s)
    try:
        attempt.result(timeout=timeout_s).close()
        return True
    except OSError:  # refused, unreachable, no DNS, or no answer in time (TimeoutError)
        return False
    finally:
        pool.shutdown(wait=False)
