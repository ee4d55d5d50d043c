"""Small helpers shared by the GPT-2 tests: tiny configs and loading the checker script by path."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELING = ROOT / "gpt2" / "modeling_gpt2.py"

# Small enough for a 2-core CPU, big enough to have several heads and layers.
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=96, vocab_size=300, bos_token_id=0, eos_token_id=0)


def load_checker():
    """Check_gpt2-base.py has a '-' in its name, so it is loaded by path."""
    name = "check_gpt2_base"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "Check_gpt2-base.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
