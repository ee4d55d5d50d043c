"""Small helpers shared by the GPT-2 tests: the files they test and tiny configs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELING = ROOT / "gpt2" / "modeling_gpt2.py"
CHECKER = ROOT / "Check_gpt2-base.py"  # a '-' in its name: tests load it with course_utils.load_script

# Small enough for a 2-core CPU, big enough to have several heads and layers.
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=96, vocab_size=300, bos_token_id=0, eos_token_id=0)
