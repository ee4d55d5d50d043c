"""Every task script runs unchanged when pasted into a notebook cell (no __file__, the kernel's own argv)."""
import subprocess
import sys

import pytest

from gpt2_helpers import ROOT

SCRIPTS = ["ChatGLM.py", "A+B_Problem.py", "Check_gpt2-base.py", "Pretraining.py", "Supervised_Fine-Tuning.py",
           "ChatGPT2-base.py"]
KERNEL_ARGV = ["/usr/local/lib/python3/dist-packages/ipykernel_launcher.py", "-f",
               "/root/.local/share/jupyter/runtime/kernel-1.json"]

# What a Colab cell does with a pasted script: exec the text as __main__, argv = the kernel's launcher line.
CELL = """
import sys
sys.argv = {argv!r}
source = open({script!r}, encoding="utf-8").read()
exec(compile(source, "<cell>", "exec"), {{"__name__": "__main__"}})
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_as_a_pasted_cell(script):
    cell = CELL.format(argv=[*KERNEL_ARGV, "--help"], script=script)
    result = subprocess.run([sys.executable, "-c", cell], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "Traceback" not in result.stderr
