"""bench/gpu_check.py: one line and exit 0 without CUDA; on the CPU (--allow-cpu --tiny) its steps run the real
scripts, read what they write and fill both reports, so the check itself works before it meets a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
needs_shared = pytest.mark.skipif(not (SHARED / "fixtures" / "chatglm2").is_dir(),
                                  reason="../shared (tokenizer, ShareGPT data, ChatGLM2 fixtures) is not beside the "
                                         "repo")


def gpu_check(*args, env=None):
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def test_without_cuda_one_line_and_exit_0(tmp_path):
    run = gpu_check("--out", str(tmp_path / "report"))
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip().splitlines()) == 1 and "No CUDA GPU" in run.stdout
    assert not (tmp_path / "report").exists()  # nothing ran, so nothing is reported


@needs_shared
def test_steps_on_cpu_fill_the_reports(tmp_path):
    out = tmp_path / "report"
    steps = ["sft-bf16", "pretrain", "nccl", "chatglm2-4bit", "api"]  # `ask` is tested in test_chatglm2_convert
    run = gpu_check("--allow-cpu", "--tiny", "--out", str(out), "--steps", *steps)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    rows = {r["step"]: r for r in report["steps"]}
    assert list(rows) == steps
    failed = {k: r["detail"] for k, r in rows.items() if r["status"] == "FAIL"}
    assert not failed and run.returncode == 0, (failed, run.stdout[-2000:])
    assert rows["nccl"]["status"] == "SKIP" and "2 GPUs" in rows["nccl"]["detail"]
    assert "loss" in rows["sft-bf16"]["detail"] and "stock PEFT" in rows["sft-bf16"]["detail"]
    assert "real tokens/s" in rows["sft-bf16"]["detail"]
    assert "tokens/s" in rows["pretrain"]["detail"] and "MFU" in rows["pretrain"]["detail"]
    assert "fp16 max abs diff" in rows["chatglm2-4bit"]["detail"]
    assert "streaming equals non-streaming" in rows["api"]["detail"]
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert markdown.count("| PASS |") == 4 and "| SKIP |" in markdown and "peak GPU memory" in markdown
