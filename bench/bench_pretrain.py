"""Benchmark for Pretraining.py (Task 5): speed at a few sizes, fp32 vs bf16, and nanoGPT's "baby GPT" run.

Part 1, throughput: a few optimizer steps at several model sizes, once in fp32 and once with bf16 autocast;
prints tokens/s, MFU (6N + 12·L·H·Q·T FLOPs per token against --peak-tflops) and the bf16/fp32 ratio.

Part 2, nanoGPT's CPU setting (README of karpathy/nanoGPT, "baby GPT": character-level, 4 layers, 4 heads,
128 wide, block 64, batch 12, lr 1e-3 → 1e-4 cosine, warmup 100, beta2 0.99, dropout 0, 2000 iterations,
eval on 20 batches). nanoGPT reports a val loss of 1.88 on tiny Shakespeare in "about 3 minutes" on a CPU,
i.e. 2000·12·64 / 180 s ≈ 8,500 tokens/s. Pass that file (nanoGPT's data/shakespeare_char/input.txt) with
--text to compare on the same text; without it the corpus is the docstrings of this Python's standard
library (as many characters as tiny Shakespeare), so the loss is NOT comparable, only the speed is.

Run:
  python bench/bench_pretrain.py                 # quick: 2 sizes, 500 baby-GPT iterations (~5 min on 2 cores)
  python bench/bench_pretrain.py --full          # + GPT-2 124M shape, 2000 iterations as in nanoGPT
  python bench/bench_pretrain.py --text input.txt --full
"""
import argparse
import ast
import json
import os
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import Pretraining  # noqa: E402

NANOGPT_VAL_LOSS = 1.88                        # README, "baby GPT" on CPU, tiny Shakespeare, 2000 iterations
NANOGPT_TOKENS_PER_S = 2000 * 12 * 64 / 180    # "~3 minutes" for the whole run, evaluation included
TINY_SHAKESPEARE_CHARS = 1_115_394

# name: (layers, heads, width, block, batch, steps in quick mode)
SIZES = {"baby": (4, 4, 128, 64, 12, 40), "small": (6, 6, 384, 256, 8, 6), "124M": (12, 12, 768, 256, 4, 4)}


def stdlib_docstrings(n_chars):
    """A deterministic English corpus available offline: docstrings of the standard library's modules."""
    stdlib, parts, total = sysconfig.get_paths()["stdlib"], [], 0
    for dirpath, dirnames, names in sorted(os.walk(stdlib)):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib"))
        for name in sorted(n for n in names if n.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40 and doc.isascii():
                        parts.append(doc)
                        total += len(doc) + 2
                        if total >= n_chars:
                            return "\n\n".join(parts)[:n_chars]
    return "\n\n".join(parts)


def run(text_path, out, size, steps, dtype, extra=()):
    n_layer, n_head, n_embd, block, batch, _ = SIZES[size]
    argv = ["--data", text_path, "--tokenizer", "char", "--out", out, "--n-layer", n_layer, "--n-head", n_head,
            "--n-embd", n_embd, "--block-size", block, "--batch-size", batch, "--max-steps", steps,
            "--dtype", dtype, "--device", "cpu", "--no-progress", "--sample-tokens", 0, *extra]
    t0 = time.perf_counter()
    Pretraining.main([str(a) for a in argv])
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    m["wall_s"] = time.perf_counter() - t0
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", help="corpus file (default: standard-library docstrings, tiny-Shakespeare sized)")
    p.add_argument("--full", action="store_true", help="2000 baby-GPT iterations and the 124M shape")
    p.add_argument("--iters", type=int, help="baby-GPT iterations (default 500, --full 2000)")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), help="sizes for the throughput table")
    p.add_argument("--baby-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="precision of the nanoGPT run (nanoGPT itself runs fp32 on a CPU)")
    p.add_argument("--model-impl", choices=["repo", "transformers"], default="repo")
    p.add_argument("--peak-tflops-fp32", type=float, default=0.28)
    p.add_argument("--peak-tflops-bf16", type=float, default=2.0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    args, _ = p.parse_known_args()
    if args.threads:
        Pretraining.torch.set_num_threads(args.threads)
    iters = args.iters or (2000 if args.full else 500)
    sizes = args.sizes or (["baby", "small", "124M"] if args.full else ["baby", "small"])
    work = tempfile.mkdtemp(prefix="bench_pretrain_")
    text = args.text
    if text is None:
        text = os.path.join(work, "stdlib_docstrings.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write(stdlib_docstrings(TINY_SHAKESPEARE_CHARS))
    elif not os.path.isfile(text):
        sys.exit(f"Error: --text {text} is not a file.")
    print(f"Corpus: {text} ({os.path.getsize(text):,} bytes); torch threads: {Pretraining.torch.get_num_threads()}, "
          f"load average before start: {os.getloadavg()[0]:.1f} (other work on the CPU slows everything down)")
    impl = ["--model-impl", args.model_impl]

    # Part 1: throughput, fp32 vs bf16 autocast.
    rows = []
    for size in sizes:
        for dtype in ("fp32", "bf16"):
            peak = args.peak_tflops_bf16 if dtype == "bf16" else args.peak_tflops_fp32
            m = run(text, os.path.join(work, f"{size}-{dtype}"), size, SIZES[size][5], dtype,
                    ["--eval-interval", 0, "--eval-iters", 1, "--peak-tflops", peak, *impl])
            rows.append((size, dtype, m["n_params"], m["tokens_per_s"], m["mfu"]))

    # Part 2: nanoGPT's baby GPT, same hyperparameters.
    nano = ["--lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", 100, "--beta2", 0.99, "--weight-decay", 0.1,
            "--grad-clip", 1.0, "--dropout", 0, "--eval-interval", 250, "--eval-iters", 20, *impl]
    baby = run(text, os.path.join(work, "nanogpt-baby"), "baby", iters, args.baby_dtype, nano)

    print("\n=== Throughput (this CPU, Pretraining.py, char vocabulary) ===")
    print(f"{'size':6} {'params':>8} {'dtype':5} {'tokens/s':>10} {'MFU':>6}  bf16/fp32")
    fp32 = {}
    for size, dtype, n, tps, mfu in rows:
        ratio = f"{tps / fp32[size]:.2f}x" if dtype == "bf16" else ""
        fp32.setdefault(size, tps)
        print(f"{size:6} {n / 1e6:7.2f}M {dtype:5} {tps:10,.0f} {mfu:6.1%}  {ratio}")
    print(f"(MFU against {args.peak_tflops_fp32} TFLOP/s fp32 and {args.peak_tflops_bf16} TFLOP/s bf16)")

    print(f"\n=== nanoGPT baby GPT setting, {iters} iterations, {args.baby_dtype} ===")
    print(f"val loss {baby['final_val_loss']:.4f}   (nanoGPT README: {NANOGPT_VAL_LOSS} after 2000 iterations on "
          f"tiny Shakespeare{'' if args.text else '; different text here, not comparable'})")
    print(f"train tokens/s {baby['tokens_per_s']:,.0f}, whole run {baby['wall_s']:.0f} s incl. tokenizing and evals "
          f"= {iters * 12 * 64 / baby['wall_s']:,.0f} tokens/s")
    print(f"ratio tokens/s vs nanoGPT's ~{NANOGPT_TOKENS_PER_S:,.0f} (its ~3 min, another machine): "
          f"{iters * 12 * 64 / baby['wall_s'] / NANOGPT_TOKENS_PER_S:.2f}x")
    print("val loss curve:", ", ".join(f"{s}:{v:.3f}" for s, v in baby["history"]["val"]))
    print(f"(outputs in {work})")


if __name__ == "__main__":
    main()
