"""What the course scripts share, and nothing else. Five small parts, each written once:

1. Command line and errors: one `UserError` (a mistake the user can fix), printed as one sentence with one prefix
   and one exit code by `run_main`; one rule for arguments a script does not know; old option names kept as
   hidden aliases.
2. Weights and data: a local directory first, then the hub cache, then a download (said aloud), else one sentence
   that names the directory to create; and which GPT-2 code loads them (this repository's or transformers').
3. Device and dtype: `--device {auto,cpu,cuda,cuda:N}` and `--dtype {auto,fp32,bf16,fp16}` mean the same everywhere;
   CPU training keeps freed memory for the next step (`keep_freed_memory`).
4. Files: atomic writes (a reader sees the old file or the whole new one, never half), and the loss-curve plot.
5. For tests and benches: loading a script by its path (the scripts' names, like `A+B_Problem.py`, are not
   importable names).
"""

import argparse
import contextlib
import importlib.util
import os
import shutil
import socket
import sys
from urllib.parse import urlparse

# -----------------------------------------------------------------------------------------------------------------
# 1. Command line and errors
# -----------------------------------------------------------------------------------------------------------------
ERROR_PREFIX = "Error: "
USER_ERROR_EXIT = 2  # argparse's own code for a bad command line; every other user mistake exits with it too


class UserError(Exception):
    """A mistake the user can fix (a missing file, a bad option). Its message is one sentence that says what to do;
    `run_main` prints it after ERROR_PREFIX, without a traceback, and exits with USER_ERROR_EXIT."""


def run_main(main):
    """The one way every script ends: `if __name__ == "__main__": run_main(main)`.

    main() returns an exit status (None means 0). A UserError becomes one line on stderr; Ctrl-C exits 130;
    a closed pipe (`python X.py | head`) ends quietly. sys.exit is not called for status 0, because in a notebook
    cell it would print a SystemExit notice."""
    try:
        code = main()
        sys.stdout.flush()
    except UserError as error:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank stops; one message is enough
            print(f"{ERROR_PREFIX}{error}", file=sys.stderr)
        code = USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's own flush cannot fail
        code = 1
    if code:
        sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors reported like every other user error (one line, the same prefix and code)."""

    def error(self, message):
        raise UserError(f"{message} (--help lists the options).")

    def add_alias(self, *old_names, dest, const=None, type=None):
        """Old spellings of an option keep working but are not shown in --help: `--output` for `--out` (give the
        new option's `type`, e.g. int). With `const`, the old name is a flag that stores const (`--reference` is
        `--model-impl transformers`)."""
        hidden = dict(dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if const is None:
            self.add_argument(*old_names, type=type, **hidden)
        else:
            self.add_argument(*old_names, action="store_const", const=const, **hidden)


def parse_args(parser, argv=None):
    """Parse argv. The one rule for unknown arguments: a notebook kernel's own (`-f .../kernel-1.json`, which
    Colab and Jupyter put in sys.argv) are dropped; anything else is a UserError, since a typo that is silently
    ignored costs a student a whole run."""
    args, unknown = parser.parse_known_args(argv)
    unknown = without_notebook_args(unknown)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def without_notebook_args(unknown):
    kept, skip_next = [], False
    for i, arg in enumerate(unknown):
        if skip_next:
            skip_next = False
        elif arg == "-f" and i + 1 < len(unknown) and unknown[i + 1].endswith(".json"):
            skip_next = True
        elif not (arg.startswith(("-f", "--f=")) and arg.endswith(".json")):
            kept.append(arg)
    return kept


def script_dir(namespace):
    """The directory of the script whose globals() are `namespace`; the current directory when the script was
    pasted into a notebook cell (no __file__ there: the cell runs in the repository root, after %cd)."""
    return os.path.dirname(os.path.abspath(namespace["__file__"])) if "__file__" in namespace else os.getcwd()


# -----------------------------------------------------------------------------------------------------------------
# 2. Weights and data: local, then the hub cache, then a download, else one sentence
# -----------------------------------------------------------------------------------------------------------------
# The files a model directory needs; skips gpt2's TF/Flax/ONNX copies, which would triple the download.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


def hub_reachable(timeout=3.0):
    """True if the hub (or the mirror in HF_ENDPOINT) answers a TCP connect within `timeout` seconds. Without this,
    from_pretrained on a machine with no network retries for about a minute before it fails."""
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


def local_or_hub(path, hub_id, base_dir, filename=None, repo_type="model", patterns=MODEL_FILES, announce=None):
    """A local copy of a model directory (or, with `filename`, of one file of a hub repository): `path` itself,
    `path` next to the script (run from elsewhere), the hub cache from an earlier download, or a fresh download
    of `hub_id` (saying so). When none of these works: a UserError naming what to create."""
    local = [path] if os.path.isabs(path) else [path, os.path.join(base_dir, path)]
    for candidate in local:
        if os.path.isfile(candidate) if filename else os.path.isdir(candidate):
            return candidate
    what = f"`{filename}` of the dataset `{hub_id}`" if filename else f"the files of hub id `{hub_id}`"
    fetch = hub_fetcher(hub_id, filename, repo_type, patterns)
    try:  # already in the hub cache from an earlier download?
        return fetch(local_files_only=True)
    except Exception:
        pass
    if not hub_reachable():
        raise UserError(f"{path} not found and the Hugging Face hub cannot be reached (no network, or "
                        f"HF_HUB_OFFLINE=1): put {what} at {path}"
                        + ("" if filename else f" (e.g. `hf download {hub_id} --local-dir {path}` on a machine with "
                                               f"network)") + ".")
    (announce or (lambda text: print(text, file=sys.stderr)))(f"{path} not found: downloading {what} from the "
                                                               f"Hugging Face hub ...")
    try:
        return fetch(local_files_only=False)
    except Exception as error:
        raise UserError(f"could not download {what} ({type(error).__name__}): put it at {path}.") from None


def gpt2_model_class(impl="repo"):
    """Which GPT-2 code loads the weights: "repo" = gpt2/modeling_gpt2.py (Task 4), "transformers" = the library's."""
    if impl == "transformers":
        from transformers import GPT2LMHeadModel
        return GPT2LMHeadModel
    try:
        from gpt2.modeling_gpt2 import GPT2LMHeadModel
    except Exception as error:  # a missing file or an unfinished handout
        raise UserError(f"cannot import gpt2/modeling_gpt2.py ({type(error).__name__}: {error}): finish it, or pass "
                        f"--model-impl transformers to use transformers' GPT-2.") from None
    return GPT2LMHeadModel


GELU_KERNELS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # config name -> F.gelu's approximate


def use_fused_gelu(model):
    """Puts PyTorch's one fused GELU kernel into every GPT-2 MLP, the one its config names: GPT-2's tanh form
    (gelu_new, written out as 7 element-wise operations, equal up to float rounding) or the exact erf form
    ("gelu", what Pretraining.py trains by default, like nanoGPT). One pass over the MLP's widest tensor instead of
    seven, and only its input kept for the backward pass; no parameters, so the state dict is unchanged.
    It also makes gpt2/modeling_gpt2.py (which always builds gelu_new, as GPT-2 has it) follow the config."""
    import torch
    activation = getattr(model.config, "activation_function", "gelu_new")
    mlps = [m for m in model.modules() if type(m).__name__ == "GPT2MLP"]
    if activation not in GELU_KERNELS:
        if any(type(m).__module__.startswith("gpt2.") for m in mlps):
            raise UserError(f"gpt2/modeling_gpt2.py has no activation {activation!r} (its config asks for it): "
                            "pass --model-impl transformers.")
        return  # transformers' GPT-2 builds the configured activation itself
    for module in mlps:
        module.act = torch.nn.GELU(approximate=GELU_KERNELS[activation])


def hub_fetcher(hub_id, filename, repo_type, patterns):
    from huggingface_hub import hf_hub_download, snapshot_download
    if filename:
        return lambda **kw: hf_hub_download(hub_id, filename, repo_type=repo_type, **kw)

    def fetch(**kw):
        path = snapshot_download(hub_id, repo_type=repo_type, allow_patterns=patterns, **kw)
        if "*.safetensors" in patterns and not has_weights(path):
            # an older model with only pytorch_model.bin: fetch that too (not always, it would double the download)
            path = snapshot_download(hub_id, repo_type=repo_type, allow_patterns=[*patterns, "*.bin"], **kw)
        if kw.get("local_files_only") and not (os.path.isfile(os.path.join(path, "config.json"))
                                               and ("*.safetensors" not in patterns or has_weights(path))):
            # the cache of an earlier, partial download (say, a tokenizer only) is not the model: fetch the rest
            raise FileNotFoundError(f"{path} is not a complete copy of {hub_id}")
        return path
    return fetch


def has_weights(directory):
    return any(name.endswith((".safetensors", ".bin")) for name in os.listdir(directory))


# -----------------------------------------------------------------------------------------------------------------
# 3. Device and dtype
# -----------------------------------------------------------------------------------------------------------------
DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]


def pick_device(name="auto"):
    """--device: auto (a GPU when PyTorch sees one), cpu, cuda or cuda:N."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but PyTorch sees no GPU: use --device cpu "
                        f"(or, on Colab, a GPU runtime).")
    return name


def cpu_supports_bf16():
    """True when this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Without them (most laptops,
    AMD before Zen 4) bf16 is emulated and slower than fp32."""
    import torch
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def keep_freed_memory():
    """Stop glibc from handing big freed blocks back to the operating system, for CPU training.

    A training step frees and re-allocates the same large tensors (activations, logits, gradients). By default
    glibc serves each one over 32 MB with a fresh mmap and unmaps it when it is freed, and the kernel zero-fills
    every page again on first touch. Kept in the heap, they are reused instead. Measured on the course's 2-core CPUs:
    Task 5 at 124M, batch 4 x 256: 3.00 s instead of 3.57 s a step in fp32, 1.32 s instead of 1.56 s in bf16; Task 8
    fp32 at batch 4 x 990: 1.25 M page faults instead of 4.2 M over 4 steps, 17.7 s instead of 20.3 s a step. The
    heap grows by a few blocks before freed neighbours merge into reusable ones (Task 8 fp32 peak 5.48 instead of
    5.12 GB), and memory freed after the peak stays with the process until it ends.
    Returns whether glibc took the setting (not on macOS, Windows or musl, whose allocators behave differently)."""
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    no_mmap = mallopt(M_MMAP_MAX, 0)  # no mmap for big blocks: they come from (and go back to) the heap
    no_trim = mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and freed heap memory is not returned to the OS
    return bool(no_mmap and no_trim)


def peak_rss_gb(pid="self"):
    """Peak resident memory of a process so far (Linux /proc VmHWM), in GB of 2**30 bytes: what the benches print."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20


def pick_dtype(name, device, cpu_bf16=None):
    """--dtype: 'fp32', 'bf16' or 'fp16' for `device`. auto = bf16 on a GPU that has it, else fp16; on a CPU bf16
    when `cpu_bf16` (default: the CPU has bf16 units), else fp32. fp16 on a CPU is refused: it is emulated there."""
    import torch
    on_gpu = str(device).startswith("cuda")
    if name == "auto":
        if on_gpu:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if (cpu_supports_bf16() if cpu_bf16 is None else cpu_bf16) else "fp32"
    if name not in DTYPE_CHOICES:
        raise UserError(f"--dtype {name}: use one of {', '.join(DTYPE_CHOICES)}.")
    if name == "fp16" and not on_gpu:
        raise UserError("--dtype fp16 needs a GPU; on a CPU use --dtype bf16 or fp32.")
    return name


def torch_dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# -----------------------------------------------------------------------------------------------------------------
# 4. Files: atomic writes and the loss plot
# -----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(out) as tmp:` write a file or a whole directory at tmp; when the block ends without an
    error, tmp takes out's place (a rename: the reader sees the old one or the whole new one); after an error,
    or a kill, out is untouched. tmp sits beside out (one file system) and keeps out's extension; its name is
    fixed, so what a killed run left half-written is simply replaced by the next write."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp, old = os.path.join(parent, f".partial-{name}"), os.path.join(parent, f".old-{name}")
    if os.path.exists(old) and not os.path.exists(path):
        os.replace(old, path)  # a run killed between the two renames below: its previous output comes back
    remove(tmp)
    remove(old)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.exists(path):
            os.replace(path, old)  # a directory cannot replace another in one step: move the old one aside first
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(old) and not os.path.exists(path):
            os.replace(old, path)  # put the previous output back
        remove(tmp)
        if isinstance(error, OSError) and error.filename == tmp:
            error.filename = path  # an error message names the file the user asked for, not the temporary one
        raise
    finally:
        remove(old)


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def plot_losses(path, train, evals=(), xlabel="step", ylabel="loss", title=None, eval_label="val"):
    """A PNG of the training loss (a line) and the evaluation loss (dots): lists of (step, loss)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed (Colab, servers)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label=eval_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# -----------------------------------------------------------------------------------------------------------------
# 5. For tests and benches: a script by its path
# -----------------------------------------------------------------------------------------------------------------
def load_script(path, name=None):
    """Import the script at `path` as a module (once: a second call returns the same module). `A+B_Problem.py`
    and `Check_gpt2-base.py` are not importable names, so `import` cannot do this."""
    path = os.path.abspath(path)
    name = name or os.path.basename(path)[:-3].replace("-", "_").replace("+", "_")
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
