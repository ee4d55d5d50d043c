"""One helper that every task script shares: can the Hugging Face Hub be reached right now?

Without this check, `from_pretrained` on a machine with no network retries for about a minute before it
fails; a TCP connect answers in seconds, so a script can say at once which directory to create instead.
"""

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout=3.0):
    """True if the hub (or the mirror in HF_ENDPOINT) answers a TCP connect within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy only the hub client itself can tell
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False
