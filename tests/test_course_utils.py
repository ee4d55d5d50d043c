"""course_utils.py: the one error, the one unknown-argument rule, hidden aliases, weights lookup, device and dtype,
atomic writes, the loss plot and loading a script by path."""
import os
import subprocess
import sys

import pytest

import course_utils as cu
from gpt2_helpers import ROOT


# ------------------------------------------------------------------------------------------------ errors, arguments
def test_run_main_prints_one_line_and_exits_2(capsys):
    def main():
        raise cu.UserError("data file x.json not found: pass --data.")
    with pytest.raises(SystemExit) as exit_:
        cu.run_main(main)
    assert exit_.value.code == cu.USER_ERROR_EXIT == 2
    assert capsys.readouterr().err == "Error: data file x.json not found: pass --data.\n"


def test_run_main_exit_status_0_raises_nothing():
    cu.run_main(lambda: None)  # a notebook cell must not see a SystemExit for a run that went well
    with pytest.raises(SystemExit) as exit_:
        cu.run_main(lambda: 1)
    assert exit_.value.code == 1


def parser():
    p = cu.ArgumentParser(prog="X.py")
    p.add_argument("--out", default="o")
    p.add_argument("--model-impl", choices=["repo", "transformers"], default="repo")
    p.add_alias("--output", dest="out")
    p.add_argument("--eval-steps", type=int, default=0)
    p.add_alias("--eval-interval", dest="eval_steps", type=int)
    p.add_alias("--reference", dest="model_impl", const="transformers")
    return p


def test_notebook_arguments_are_dropped_and_anything_else_is_an_error():
    kernel = ["-f", "/root/.local/share/jupyter/runtime/kernel-1.json"]
    assert cu.parse_args(parser(), kernel + ["--out", "a"]).out == "a"
    assert cu.parse_args(parser(), ["--f=/run/kernel-2.json"]).out == "o"  # VS Code's spelling
    with pytest.raises(cu.UserError, match=r"unrecognized arguments: --max-step 3 \(--help lists the options\)\."):
        cu.parse_args(parser(), ["--max-step", "3"])
    with pytest.raises(cu.UserError, match="invalid choice"):
        cu.parse_args(parser(), ["--model-impl", "mine"])


def test_old_spellings_work_and_are_hidden():
    assert cu.parse_args(parser(), ["--output", "b"]).out == "b"
    assert cu.parse_args(parser(), ["--eval-interval", "100"]).eval_steps == 100
    assert cu.parse_args(parser(), ["--reference"]).model_impl == "transformers"
    assert cu.parse_args(parser(), []).model_impl == "repo"
    shown = parser().format_help()
    assert "--out" in shown and "--output" not in shown and "--reference" not in shown


def test_a_bad_option_in_a_real_process_is_one_line_with_exit_2():
    result = subprocess.run([sys.executable, str(ROOT / "convert_chatglm2.py"), "a", "b", "--bogus"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: unrecognized arguments: --bogus") and result.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------ weights and data
def test_local_directory_first_then_beside_the_script(tmp_path, monkeypatch):
    (tmp_path / "model" / "gpt2-base").mkdir(parents=True)
    monkeypatch.chdir(ROOT)
    assert cu.local_or_hub("model/gpt2-base", "gpt2", tmp_path) == os.path.join(tmp_path, "model/gpt2-base")
    monkeypatch.chdir(tmp_path)
    assert cu.local_or_hub("model/gpt2-base", "gpt2", ROOT) == "model/gpt2-base"


def test_offline_and_not_cached_says_what_to_create(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cu.UserError) as error:
        cu.local_or_hub("model/gpt2-base", "gpt2", tmp_path)
    message = str(error.value)
    assert "model/gpt2-base not found" in message and "hf download gpt2 --local-dir model/gpt2-base" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    with pytest.raises(cu.UserError, match="`sharegpt_gpt4.json` of the dataset `openchat/openchat_sharegpt4_dataset`"):
        cu.local_or_hub("data/sharegpt_gpt4.json", "openchat/openchat_sharegpt4_dataset", tmp_path,
                        filename="sharegpt_gpt4.json", repo_type="dataset")


def test_the_gpt2_classes():
    from transformers import GPT2LMHeadModel
    assert cu.gpt2_model_class("transformers") is GPT2LMHeadModel
    assert cu.gpt2_model_class("repo").__module__ == "gpt2.modeling_gpt2"


# ------------------------------------------------------------------------------------------------ device and dtype
def test_device_and_dtype_rules(monkeypatch):
    import torch
    assert cu.pick_device("cpu") == "cpu"
    with pytest.raises(cu.UserError, match="use auto, cpu, cuda or cuda:N"):
        cu.pick_device("gpu")
    if not torch.cuda.is_available():
        assert cu.pick_device("auto") == "cpu"
        with pytest.raises(cu.UserError, match="sees no GPU"):
            cu.pick_device("cuda:0")
    assert cu.pick_dtype("auto", "cpu", cpu_bf16=False) == "fp32"
    assert cu.pick_dtype("auto", "cpu", cpu_bf16=True) == "bf16"
    assert cu.pick_dtype("bf16", "cpu") == "bf16"
    with pytest.raises(cu.UserError, match="fp16 needs a GPU"):
        cu.pick_dtype("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert cu.pick_dtype("auto", "cuda:1") == "fp16"
    assert cu.torch_dtype("bf16") is torch.bfloat16


FAULTS_ON_REALLOCATION = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import course_utils
def faults_of_eight_allocations():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.ones(16 * 2**20)  # 64 MB, allocated, written and freed, as a training step's activations are
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
before = faults_of_eight_allocations()
accepted = course_utils.keep_freed_memory()
faults_of_eight_allocations()  # the heap grows by a few blocks until freed neighbours merge into reusable ones
print(before, accepted, faults_of_eight_allocations())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    # In a process of its own: the setting lasts for the whole process.
    result = subprocess.run([sys.executable, "-c", FAULTS_ON_REALLOCATION, str(ROOT)], capture_output=True,
                            text=True, timeout=120, check=True)
    before, accepted, after = result.stdout.split()
    assert accepted == "True"
    before, after = int(before), int(after)
    assert before > 8 * 16  # glibc gave the memory back each time (16,384 faults in 4 kB pages, 32 in 2 MB ones)
    assert after * 10 < before  # now freed blocks are reused


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_stays_with_the_process_on_cpu():
    """After keep_freed_memory a freed 400 MB tensor is kept for the next step (resident memory stays);
    without it glibc gives it back to the OS at once, to be page-faulted in again."""
    probe = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import course_utils\n"
             "if sys.argv[2] == 'keep': course_utils.keep_freed_memory()\n"
             "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
             "before = rss(); x = torch.ones(100 * 2**20); del x; print(rss() - before)")
    kept = {mode: int(subprocess.run([sys.executable, "-c", probe, str(ROOT), mode], capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for mode in ("keep", "default")}
    assert kept["keep"] > 350 and kept["default"] < 50, kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux only")
def test_peak_rss_of_this_process_and_of_another():
    """The benches' peak memory: VmHWM in GB of 2**30 bytes, for this process or any process id."""
    probe = ("import time; x = bytearray(300 * 2**20); print('up', flush=True);"
             " time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        assert 0.29 < cu.peak_rss_gb(child.pid) < 0.5
    finally:
        child.kill()
        child.wait()
    resident = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    assert cu.peak_rss_gb() >= resident > 0


# ------------------------------------------------------------------------------------------------ files
def test_atomic_file_and_directory(tmp_path):
    target = tmp_path / "sub" / "report.json"
    with cu.atomic_path(target) as tmp:
        assert not os.path.exists(target) and tmp.endswith("report.json")
        open(tmp, "w").write("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError):
        with cu.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "new" and os.listdir(target.parent) == ["report.json"]
    out = tmp_path / "adapter"
    for text in ("one", "two"):
        with cu.atomic_path(out) as tmp:
            os.makedirs(tmp)
            open(os.path.join(tmp, "weights"), "w").write(text)
    assert (out / "weights").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["adapter", "sub"]
    with pytest.raises(KeyboardInterrupt):
        with cu.atomic_path(out) as tmp:
            os.makedirs(tmp)
            raise KeyboardInterrupt
    assert (out / "weights").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["adapter", "sub"]


def test_atomic_write_after_a_kill(tmp_path):
    """What a killed run left behind: a half-written temporary is replaced, and an output moved aside just
    before the kill comes back. An error names the file asked for, not the temporary one."""
    (tmp_path / ".partial-ckpt.pt").write_text("half of a checkpoint")
    (tmp_path / ".old-adapter").mkdir()
    (tmp_path / ".old-adapter" / "weights").write_text("previous")
    with cu.atomic_path(tmp_path / "ckpt.pt") as tmp:
        open(tmp, "w").write("whole")
    with pytest.raises(RuntimeError):
        with cu.atomic_path(tmp_path / "adapter"):
            raise RuntimeError("this write fails too")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "ckpt.pt"] and (tmp_path / "ckpt.pt").read_text() == "whole"
    assert (tmp_path / "adapter" / "weights").read_text() == "previous"
    with pytest.raises(IsADirectoryError) as error:
        with cu.atomic_path(tmp_path / "adapter") as tmp:  # a file where a directory stands
            open(tmp, "w").write("x")
    assert error.value.filename == str(tmp_path / "adapter")


def test_loss_plot_is_a_png(tmp_path):
    cu.plot_losses(tmp_path / "loss.png", [(1, 3.0), (2, 2.5), (3, 2.2)], [(0, 3.1), (3, 2.3)], title="t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["loss.png"]


def test_load_script_by_path():
    ab = cu.load_script(ROOT / "A+B_Problem.py")
    assert ab.__name__ == "A_B_Problem" and callable(ab.main)
    assert cu.load_script(ROOT / "A+B_Problem.py") is ab  # once


@pytest.mark.parametrize("complete", [True, False])
def test_the_hub_cache_is_used_offline(tmp_path, complete):
    """An earlier download sits in the hub cache: found without network (huggingface_hub's own cache layout;
    a fresh process, because huggingface_hub reads HF_HOME when it is imported)."""
    repo = tmp_path / "hf" / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer_config.json").write_text("{}")
    if complete:  # else only a tokenizer was downloaded before: that is not the model
        (snapshot / "config.json").write_text("{}")
        (snapshot / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    code = "import course_utils as cu; print(cu.local_or_hub('model/gpt2-base', 'gpt2', '.'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
                                     PYTHONPATH=str(ROOT)))
    if complete:
        assert result.returncode == 0, result.stderr[-2000:]
        assert os.path.samefile(result.stdout.strip(), snapshot)
    else:
        assert result.returncode == 1 and "hub cannot be reached" in result.stderr
