"""The GPU check: every CUDA path of the course, in one command of at most ~8 minutes on one GPU.

    python bench/gpu_check.py                 # writes out/gpu_check/report.md and report.json

Nothing is downloaded: a GPT-2 of the 124M shape (random weights, GPT-2's real tokenizer from ../shared) and the
tiny ChatGLM2 fixtures of ../shared/fixtures/chatglm2 are all it needs. Each step runs the course's scripts the
way a student runs them (a subprocess with the same command line) and becomes one row of the report: PASS, FAIL
or SKIP, its time, its peak GPU memory (read with nvidia-smi while it runs) and what it measured.

Without CUDA it prints one line and exits 0 (CI runs it that way). `--allow-cpu --tiny` runs the same steps on
the CPU with tiny shapes, fp32/bf16 and no 4-bit: that is how the check itself is tested on a machine without GPU.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from course_utils import ArgumentParser, UserError, atomic_path, cpu_supports_bf16, parse_args, run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "gpt2-tokenizer"
SHAREGPT = SHARED / "data" / "sharegpt_dev_2000.json"
CHATGLM2 = SHARED / "fixtures" / "chatglm2"
PY = sys.executable


# ----------------------------------------------------------------------------------------------- running steps

class GpuMemoryPeak:
    """Highest GPU memory in use (MiB, over the idle level) while a step runs, polled from nvidia-smi.

    The steps run in child processes, so torch.cuda.max_memory_allocated of this process would see nothing."""

    def __init__(self):
        self.peak = self.idle = None
        self._stop = threading.Event()

    @staticmethod
    def used_mib():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return sum(int(x) for x in out.split())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def _poll(self):
        while not self._stop.wait(0.25):
            used = self.used_mib()
            if used is not None:
                self.peak = max(self.peak or 0, used)

    def __enter__(self):
        self.idle = self.used_mib()
        self.peak = self.idle
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def over_idle(self):
        return None if self.peak is None or self.idle is None else self.peak - self.idle


class StepFailed(Exception):
    """A step's check did not hold: the message is the row's detail."""


def run(cmd, log, timeout, env=None, **kwargs):
    """Run one command line, its output appended to the step's log; a non-zero exit fails the step."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            done = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout, env={**os.environ, **(env or {})}, **kwargs)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"timed out after {timeout} s: {Path(cmd[1]).name}")
    if done.returncode != 0:
        raise StepFailed(f"{Path(str(cmd[1])).name} exited with {done.returncode} (last lines: {tail(log)})")


def tail(log, lines=3):
    text = Path(log).read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(line.strip()[:160] for line in text[-lines:])


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------------------------- inputs

def build_gpt2(work, tiny):
    """A GPT-2 of the 124M shape (or a tiny one) with random weights and GPT-2's real tokenizer, saved like
    model/gpt2-base, and ShareGPT conversations as SFT data and as pretraining text."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    model_dir = work / "gpt2-124M-random"
    if not (model_dir / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(TOKENIZER)
        shape = dict(n_layer=2, n_head=2, n_embd=64, n_positions=256) if tiny else {}
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    conversations = json.loads(SHAREGPT.read_text(encoding="utf-8"))[:40 if tiny else 2000]
    sft_data = work / "sharegpt.json"
    sft_data.write_text(json.dumps(conversations[:400], ensure_ascii=False), encoding="utf-8")
    text_dir = work / "pretrain_text"
    text_dir.mkdir(exist_ok=True)
    turns = (t.get("value") for c in conversations if isinstance(c, dict)
             for t in c.get("items") or [] if isinstance(t, dict) and isinstance(t.get("value"), str))
    (text_dir / "sharegpt.txt").write_text("\n\n".join(turns), encoding="utf-8")
    return model_dir, sft_data, text_dir


# ----------------------------------------------------------------------------------------------- the steps

def step_checker(ctx):
    out = ctx.work / "check.json"
    run([PY, "Check_gpt2-base.py", "--device", ctx.device, "--json", out], ctx.log, 300,
        env={"HF_HUB_OFFLINE": "1"})
    result = json.loads(out.read_text(encoding="utf-8"))
    return f"{len(result['checks'])} checks passed on {result['device']}; weights: {result['weights']}"


def step_sft(ctx, precision):
    out = ctx.work / f"sft-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}-checkpoints", ignore_errors=True)
    quant = "none" if ctx.tiny else "4bit"
    if ctx.device == "cpu" and precision == "fp16":
        precision = "fp32"  # mixed fp16 needs CUDA; on the CPU the step checks the rest of the path
    steps, batch = (12 if ctx.tiny else 30), 4
    common = ["--model", ctx.gpt2, "--data", ctx.sft_data, "--max-length", 256 if ctx.tiny else 1024, "--eval-size", 0]
    run([PY, "Supervised_Fine-Tuning.py", *common, "--out", out, "--quant", quant, "--dtype", precision,
         "--max-steps", steps, "--batch-size", batch, "--lr", "2e-3", "--logging-steps", 1, "--save-steps", 1000],
        ctx.log, 420, env={"HF_HUB_OFFLINE": "1"})
    metrics = json.loads((out / "train_metrics.json").read_text(encoding="utf-8"))
    # Real tokens/s: the script's windows have no padding inside, so the mean window length of its own examples
    # (--dump-dataset) times the windows trained, over the Trainer's train_runtime.
    dump = ctx.work / "sft-examples.jsonl"
    if not dump.exists():
        run([PY, "Supervised_Fine-Tuning.py", *common, "--dump-dataset", dump], ctx.log, 300,
            env={"HF_HUB_OFFLINE": "1"})
    lengths = [len(json.loads(line)["input_ids"]) for line in dump.read_text(encoding="utf-8").splitlines()]
    runtime = [h["train_runtime"] for h in metrics["log_history"] if "train_runtime" in h]
    if runtime and lengths:
        metrics["real_tokens_per_s"] = sum(lengths) / len(lengths) * steps * batch / runtime[-1]
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    if len(losses) < 10:  # --logging-steps 1: one value per step
        raise StepFailed(f"only {len(losses)} loss values were logged")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    if not last < first:
        raise StepFailed(f"the loss did not fall: mean of the first 5 steps {first:.3f}, of the last 5 {last:.3f}")
    # The adapter loads with stock transformers + PEFT, on the CPU, and changes the base model's output.
    check = ("import sys, torch; from transformers import GPT2LMHeadModel; from peft import PeftModel\n"
             "base = GPT2LMHeadModel.from_pretrained(sys.argv[1]); ids = torch.tensor([[464, 3290, 318]])\n"
             "before = base(ids).logits\n"
             "tuned = PeftModel.from_pretrained(base, sys.argv[2]).eval()\n"
             "print('adapter changes logits by', (tuned(ids).logits - before).abs().max().item())\n"
             "assert not torch.equal(tuned(ids).logits, before)\n")
    run([PY, "-c", check, ctx.gpt2, out], ctx.log, 120, env={"CUDA_VISIBLE_DEVICES": ""})
    speed = metrics.get("real_tokens_per_s")
    speed = f", about {speed:,.0f} real tokens/s" if isinstance(speed, (int, float)) else ""
    # The precision it trained in: the script itself falls back to fp32 on a CPU without bf16 units.
    return (f"{quant} {metrics.get('precision', precision)}: loss {first:.3f} -> {last:.3f} "
            f"(first/last 5 steps){speed}; adapter loads with stock PEFT on the CPU")


def step_pretrain(ctx):
    out = ctx.work / "pretrain"
    shutil.rmtree(out, ignore_errors=True)
    size = ["--size", "tiny"] if ctx.tiny else ["--size", "124M"]
    dtype = "bf16" if ctx.device == "cuda" or cpu_supports_bf16() else "fp32"
    cmd = [PY, "Pretraining.py", "--data", ctx.text, "--tokenizer", "gpt2", "--tokenizer-path", TOKENIZER, *size,
           "--out", out, "--max-steps", 20 if ctx.tiny else 100, "--batch-size", 8, "--dtype", dtype,
           "--eval-steps", 50, "--eval-iters", 5, "--no-progress", "--device", ctx.device]
    if not ctx.tiny:
        cmd.append("--compile")
    run(cmd, ctx.log, 420, env={"HF_HUB_OFFLINE": "1"})
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    compiled = " + torch.compile" if not ctx.tiny else ""
    return (f"{dtype}{compiled}, {m['steps']} steps: {m['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {m['mfu']:.1%}, val loss {m['final_val_loss']:.3f}")


def step_nccl(ctx):
    import torch
    if ctx.device != "cuda" or torch.cuda.device_count() < 2:
        return "SKIP", f"needs 2 GPUs, this machine has {torch.cuda.device_count() if ctx.device == 'cuda' else 0}"
    out = ctx.work / "pretrain-ddp"
    shutil.rmtree(out, ignore_errors=True)
    run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "Pretraining.py",
         "--data", ctx.text, "--tokenizer", "gpt2", "--tokenizer-path", TOKENIZER, "--size", "small",
         "--out", out, "--max-steps", 30, "--batch-size", 8, "--dtype", "bf16", "--no-progress"],
        ctx.log, 300, env={"HF_HUB_OFFLINE": "1"})
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    if m.get("world_size") != 2:
        raise StepFailed(f"ran with world size {m.get('world_size')}, not 2")
    return f"2 processes (NCCL): {m['tokens_per_s']:,.0f} tokens/s, val loss {m['final_val_loss']:.3f}"


def converted_chatglm2(ctx):
    """The float ChatGLM2 fixture converted once with `ChatGLM.py --convert`, shared by the ChatGLM steps."""
    out = ctx.work / "chatglm2-tiny-hf"
    if not (out / "config.json").exists():
        run([PY, "ChatGLM.py", "--convert", CHATGLM2 / "chatglm2-tiny", out], ctx.log, 120,
            env={"HF_HUB_OFFLINE": "1"})
    return out


COMPARE_4BIT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
model_dir, reference, device, quantize = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
ref = json.load(open(reference))
ids = torch.tensor([ref["logits_input_ids"]], device=device)
want = torch.tensor(ref["logits"]).reshape(1, ids.shape[1], -1).float()
def logits(**kw):
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device, **kw).eval()
    with torch.no_grad():
        got = model(ids).logits.float().cpu()[..., :want.shape[-1]]
    return got
kinds = {"fp16": dict(dtype=torch.float16)}
if quantize:
    kinds["nf4"] = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16))
result = {}
for name, kw in kinds.items():
    got = logits(**kw)
    diff = (got - want).abs().max().item()
    result[name] = {"max_abs_diff": diff, "relative": diff / want.abs().max().item(),
                    "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
print(json.dumps(result))
"""


def step_chatglm2_4bit(ctx):
    model = converted_chatglm2(ctx)
    quantize = ctx.device == "cuda"
    log_before = len(Path(ctx.log).read_text(encoding="utf-8")) if Path(ctx.log).exists() else 0
    run([PY, "-c", COMPARE_4BIT, model, CHATGLM2 / "chatglm2-tiny" / "reference.json", ctx.device, int(quantize)],
        ctx.log, 120)
    result = json.loads(Path(ctx.log).read_text(encoding="utf-8")[log_before:].strip().splitlines()[-1])
    fp16 = result["fp16"]
    if fp16["relative"] > 1e-2:
        raise StepFailed(f"fp16 logits are {fp16['relative']:.2e} of their scale from the reference")
    detail = f"fp16 max abs diff {fp16['max_abs_diff']:.2e} ({fp16['relative']:.1e} of scale)"
    if quantize:
        nf4 = result["nf4"]
        detail += (f"; NF4 4-bit max abs diff {nf4['max_abs_diff']:.3f} ({nf4['relative']:.1%} of scale), "
                   f"argmax agreement {nf4['argmax_agreement']:.0%}")
        if nf4["relative"] > 0.25 or nf4["argmax_agreement"] < 0.5:
            raise StepFailed("4-bit logits too far from the float reference: " + detail)
    return detail


def step_ask(ctx):
    model = converted_chatglm2(ctx)
    quant = [] if ctx.tiny else ["--quant", "4bit"]
    before = len(Path(ctx.log).read_text(encoding="utf-8"))
    run([PY, "ChatGLM.py", "--model", model, "--device", ctx.device, *quant, "--ask", "你好",
         "--max-new-tokens", 8, "--temperature", 0], ctx.log, 180, env={"HF_HUB_OFFLINE": "1"})
    said = Path(ctx.log).read_text(encoding="utf-8")[before:].strip().splitlines()
    return f"answered on {ctx.device}{' in 4-bit' if quant else ''}: {said[-1][:80]!r}"


def wait_for(url, proc, seconds=180):
    import httpx
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise StepFailed(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise StepFailed(f"{url} did not answer within {seconds} s")


def serve(ctx, mode):
    """Start `ChatGLM.py --api` or `--web` on the converted fixture; returns (process, base url).

    --temperature 0: the scheduler takes the argmax. (A greedy request on a sampling scheduler is top_k=1, which
    keeps every token tied for the top score: a tiny random model in bf16/fp16 has such ties, and then the streamed
    and the whole answer could differ.)"""
    port = free_port()
    quant = [] if ctx.tiny else ["--quant", "4bit"]
    log = open(ctx.log, "a", encoding="utf-8")
    proc = subprocess.Popen([PY, "ChatGLM.py", "--model", str(converted_chatglm2(ctx)), "--device", ctx.device,
                             *quant, mode, "--port", str(port), "--max-new-tokens", "8", "--temperature", "0"],
                            cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                           "GRADIO_ANALYTICS_ENABLED": "False"})
    return proc, f"http://127.0.0.1:{port}"


def step_api(ctx):
    import openai
    proc, url = serve(ctx, "--api")
    try:
        wait_for(f"{url}/v1/models", proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "你好"}]
        whole = client.chat.completions.create(model="chatglm2", messages=messages, max_tokens=8, temperature=0)
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="chatglm2", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]
        if "".join(pieces) != whole.choices[0].message.content:
            raise StepFailed("the streamed answer differs from the whole one")
        return (f"official openai client on {ctx.device}: {whole.usage.completion_tokens} tokens, "
                f"streaming equals non-streaming")
    finally:
        proc.terminate()
        proc.wait(30)


def step_web(ctx):
    import httpx
    proc, url = serve(ctx, "--web")
    try:
        wait_for(url, proc)
        page = httpx.get(url, timeout=10)
        if page.status_code != 200 or "gradio" not in page.text.lower():
            raise StepFailed(f"GET {url} gave {page.status_code}")
        return f"Gradio page served on {ctx.device}"
    finally:
        proc.terminate()
        proc.wait(30)


STEPS = [
    ("checker", "Check_gpt2-base.py on CUDA, 124M shape", step_checker),
    ("sft-fp16", "SFT: 4-bit NF4 + double quantization, fp16, 30 steps", lambda ctx: step_sft(ctx, "fp16")),
    ("sft-bf16", "SFT: 4-bit NF4 + double quantization, bf16, 30 steps", lambda ctx: step_sft(ctx, "bf16")),
    ("pretrain", "Pretraining.py: bf16 + --compile, 100 steps, 124M", step_pretrain),
    ("nccl", "Pretraining.py: 2 processes with NCCL", step_nccl),
    ("chatglm2-4bit", "ChatGLM2 fixture, converted, fp16 and 4-bit vs its float reference", step_chatglm2_4bit),
    ("ask", "ChatGLM.py --ask with a 4-bit model", step_ask),
    ("api", "ChatGLM.py --api answering the official openai client", step_api),
    ("web", "ChatGLM.py --web serving its page", step_web),
]


# ----------------------------------------------------------------------------------------------- report

def write_report(rows, out, device_name):
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# GPU check — {device_name}", "", f"{time.strftime('%Y-%m-%d %H:%M')}, "
             f"{sum(r['status'] == 'PASS' for r in rows)} PASS, {sum(r['status'] == 'FAIL' for r in rows)} FAIL, "
             f"{sum(r['status'] == 'SKIP' for r in rows)} SKIP", "",
             "| step | result | time | peak GPU memory | details |", "|---|---|---|---|---|"]
    for r in rows:
        mem = "n/a" if r["gpu_mib"] is None else f"{r['gpu_mib']:,} MiB"
        detail = r["detail"].replace("|", "/")
        lines.append(f"| {r['title']} | {r['status']} | {r['seconds']:.0f} s | {mem} | {detail} |")
    for name, text in (("report.md", "\n".join(lines) + "\n"),
                       ("report.json", json.dumps({"device": device_name, "steps": rows}, indent=1))):
        with atomic_path(out / name) as tmp:  # a report is either the old one or the whole new one
            Path(tmp).write_text(text, encoding="utf-8")
    return "\n".join(lines)


def parse_arguments(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/gpu_check", help="where report.md and report.json go")
    p.add_argument("--steps", nargs="+", choices=[s[0] for s in STEPS], help="run only these steps")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (testing the check)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 shapes and no 4-bit (testing the check)")
    return parse_args(p, argv)


def main(argv=None):
    args = parse_arguments(argv)
    import torch
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("No CUDA GPU on this machine: the GPU check has nothing to run "
              "(it exits 0; run it on a GPU, e.g. Colab).")
        return 0
    for path in (TOKENIZER, SHAREGPT, CHATGLM2):
        if not path.exists():
            raise UserError(f"{path} is missing; the GPU check needs ../shared beside the repository.")
    ctx = argparse.Namespace(device="cuda" if torch.cuda.is_available() else "cpu", tiny=args.tiny,
                             work=Path(args.out).resolve() / "work")
    ctx.work.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(0) if ctx.device == "cuda" else "CPU (no GPU; testing the check)"
    ctx.gpt2, ctx.sft_data, ctx.text = build_gpt2(ctx.work, args.tiny)
    rows, started = [], time.time()
    for key, title, step in STEPS:
        if args.steps and key not in args.steps:
            continue
        ctx.log = ctx.work / f"{key}.log"
        ctx.log.write_text("", encoding="utf-8")
        t0 = time.time()
        with GpuMemoryPeak() as memory:
            try:
                result = step(ctx)
                status, detail = result if isinstance(result, tuple) else ("PASS", result)
            except StepFailed as e:
                status, detail = "FAIL", str(e)
            except Exception as e:  # a crash in the check itself is a failed row, not a lost report
                status, detail = "FAIL", f"{type(e).__name__}: {e}"
        rows.append({"step": key, "title": title, "status": status, "seconds": round(time.time() - t0, 1),
                     "gpu_mib": memory.over_idle(), "detail": detail, "log": str(ctx.log)})
        print(f"{status:4}  {time.time() - t0:6.1f} s  {title}: {detail}", flush=True)
        write_report(rows, Path(args.out), device_name)
    print(f"\n{write_report(rows, Path(args.out), device_name)}\n\nTotal {time.time() - started:.0f} s; "
          f"reports in {args.out}/report.md and report.json")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    run_main(main)
