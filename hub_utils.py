"""One helper that every task script shares: can the Hugging Face Hub be reached right now?

Without this check, `from_pretrained` on a machine with no network retries for about a minute before it
fails; a TCP connect answers in seconds, so a script can say at once which directory to create instead.
"""

import os
import socket
import sys
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


# The files a model directory needs; skips gpt2's TF/Flax/ONNX copies, which would triple the download.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


def local_or_hub_model(path, hub_id, script_dir, announce=None):
    """A local directory with the model: `path` itself, `path` next to the script (run from elsewhere), the hub
    cache from an earlier download, or a fresh download of `hub_id` (saying so). When none of these works,
    ends the run with one sentence (SystemExit) naming the directory to create."""
    from huggingface_hub import snapshot_download

    if os.path.isdir(path):
        return path
    if not os.path.isabs(path) and os.path.isdir(os.path.join(script_dir, path)):
        return os.path.join(script_dir, path)
    try:  # already in the hub cache from an earlier download?
        return snapshot_download(hub_id, allow_patterns=MODEL_FILES, local_files_only=True)
    except Exception:
        pass
    if not hub_reachable():
        raise SystemExit(f"Error: no model in {path} and the Hugging Face hub cannot be reached: create {path} with the "
                         f"files of hub id `{hub_id}` (e.g. `hf download {hub_id} --local-dir {path}` on a machine with network).")
    (announce or (lambda text: print(text, file=sys.stderr)))(f"{path} not found: downloading `{hub_id}` from the Hugging Face hub ...")
    try:
        return snapshot_download(hub_id, allow_patterns=MODEL_FILES)
    except Exception as error:
        raise SystemExit(f"Error: could not download `{hub_id}` ({type(error).__name__}): create {path} with the files of hub id `{hub_id}`.") from None
