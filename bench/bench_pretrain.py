"""Benchmark for Pretraining.py (Task 5): against nanoGPT at its CPU "baby GPT" setting, and bf16 vs fp32 at GPT-2 124M.

Part 1 (needs --nanogpt DIR, a checkout of karpathy/nanoGPT): nanoGPT's own train.py and Pretraining.py, one
after the other (alternating), on the same text prepared the same way: characters, 90% train / 10% val,
nanoGPT's README CPU command (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations, lr 1e-3 -> 1e-4,
warmup 100, beta2 0.99, dropout 0, eval on 20 batches, fp32). Printed: median time per iteration and tokens/s
(12·64 / median), wall time of the whole process, val loss at iteration 2000 as each script reports it, and
both final models scored on the same held-out text (every 64-character window, not 20 random batches).

Part 2: one Pretraining.py training step at GPT-2 124M's shape (12 layers, 12 heads, 768 wide, GPT-2's 50,257
token vocabulary from ../shared/gpt2-tokenizer or model/gpt2-base, batch 4 x 256) in fp32, in bf16 by autocast
(the default) and in bf16 with bf16 weights and an fp32 master copy (--master-weights); median step time, ratios,
peak memory, and the loss of every step side by side (same initial weights, same batches).

The text: --text FILE, or by default 1,115,394 characters (tiny Shakespeare's length) of English Wikipedia
articles, from the dump sample that gensim ships for its tests (markup stripped with gensim's filter_wiki).

Run (under the lock when others share the machine; each part takes a few minutes on 2 cores):
  flock /work/flags/bench.lock python bench/bench_pretrain.py --nanogpt /tmp/nanogpt
  python bench/bench_pretrain.py --part 2 --steps 30
"""
import bz2
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from course_utils import ArgumentParser, UserError, parse_args, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SHAKESPEARE_CHARS = 1_115_394
BABY = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
# nanoGPT README, "I only have a macbook": the command, on top of config/train_shakespeare_char.py.
NANOGPT_CPU_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                     "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]


# ----------------------------------------------------------------------------- the text
def wikipedia_sample(n_chars):
    """English Wikipedia articles as plain ASCII text, from the dump sample in gensim's test data."""
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    dump = os.path.join(gensim.__path__[0], "test", "test_data",
                        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    parts, total = [], 0
    with bz2.open(dump) as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            text = re.sub(r"'{2,}", "", filter_wiki(text))  # bold / italic quotes
            text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)  # == Heading == -> Heading
            text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()  # é -> e; drop the rest
            text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", text)).strip()
            parts.append(f"{title}\n\n{text}")
            total += len(parts[-1]) + 2
            if total >= n_chars:
                break
    return "\n\n".join(parts)[:n_chars]


def write_nanogpt_data(text, directory):
    """What nanoGPT's data/shakespeare_char/prepare.py writes, for this text: meta.pkl, train.bin, val.bin."""
    os.makedirs(directory, exist_ok=True)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    for name, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(os.path.join(directory, f"{name}.bin"))
    with open(os.path.join(directory, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


# ----------------------------------------------------------------------------- running the two scripts
def run_nanogpt(nanogpt, dataset, out, iters):
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU_FLAGS,
           f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--dataset={dataset}", f"--out_dir={out}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=nanogpt, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise UserError(f"nanoGPT's train.py failed (exit code {r.returncode}), its last output:\n{r.stderr[-2000:]}")
    times = [float(t) / 1000 for t in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", r.stdout, re.M)]
    val = {int(s): float(v)
           for s, v in re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", r.stdout, re.M)}
    return {"step_seconds": times[1:], "val": val, "wall_s": wall}  # iteration 0 includes the first evaluation


def run_ours(text_path, out, iters, extra=()):
    cmd = [sys.executable, os.path.join(ROOT, "Pretraining.py"), "--data", text_path, "--out", out,
           "--device", "cpu", "--no-progress", "--max-steps", iters, *extra]
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - t0
    if r.returncode:
        raise UserError(f"Pretraining.py failed (exit code {r.returncode}), its last output:\n"
                        f"{(r.stdout + r.stderr)[-2000:]}")
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    m["val"] = {int(s): v for s, v in m["history"]["val"]}
    m["wall_s"] = wall
    return m


def ours_baby_args(iters):
    """Pretraining.py with nanoGPT's hyperparameters (its defaults differ only in names)."""
    b = BABY
    return ["--tokenizer", "char", "--n-layer", b["n_layer"], "--n-head", b["n_head"], "--n-embd", b["n_embd"],
            "--block-size", b["block_size"], "--batch-size", b["batch_size"], "--lr", "1e-3", "--min-lr", "1e-4",
            "--warmup-steps", 100, "--beta2", 0.99, "--weight-decay", 0.1, "--grad-clip", 1.0, "--dropout", 0,
            "--eval-steps", 250, "--eval-iters", 20, "--dtype", "fp32", "--sample-tokens", 0]


# ----------------------------------------------------------------------------- the same held-out text for both
@torch.no_grad()
def heldout_loss(logits_fn, ids, block):
    """Mean next-character loss over every non-overlapping window of block+1 characters of `ids`."""
    n = (len(ids) - 1) // block
    x = torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)
    y = torch.tensor(ids[1: n * block + 1], dtype=torch.long).view(n, block)
    losses = [torch.nn.functional.cross_entropy(logits_fn(xb).flatten(0, 1), yb.flatten(), reduction="sum")
              for xb, yb in zip(x.split(256), y.split(256))]
    return float(sum(losses) / y.numel())


def score_both(text, nanogpt, nano_out, ours_out):
    """Both trained models on the same characters: the part of the text that both scripts held out."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    tail = text[-int(len(text) * 0.1) + 2:]  # our split keeps one character less (it counts an end-of-text token)
    sys.path.insert(0, nanogpt)
    from model import GPT, GPTConfig  # nanoGPT's model.py, from the checkout (not part of this repository)
    ckpt = torch.load(os.path.join(nano_out, "ckpt.pt"), map_location="cpu", weights_only=False)
    nano = GPT(GPTConfig(**ckpt["model_args"]))
    nano.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    nano.eval()
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    # nanoGPT's forward without targets returns only the last position's logits: ask for all of them.
    nano_fn = lambda xb: nano.lm_head(nano_forward_hidden(nano, xb))  # noqa: E731
    nano_loss = heldout_loss(nano_fn, [stoi[c] for c in tail], BABY["block_size"])
    tok = AutoTokenizer.from_pretrained(ours_out)
    ours = GPT2LMHeadModel.from_pretrained(ours_out).eval()  # stock transformers loads our output
    ours_loss = heldout_loss(lambda xb: ours(input_ids=xb).logits, tok(tail)["input_ids"], BABY["block_size"])
    return nano_loss, ours_loss, ckpt["iter_num"], len(tail)


def nano_forward_hidden(model, idx):
    """nanoGPT's GPT.forward up to the final LayerNorm (its own forward keeps only the last position without
    targets)."""
    pos = torch.arange(idx.size(1))
    x = model.transformer.drop(model.transformer.wte(idx) + model.transformer.wpe(pos))
    for block in model.transformer.h:
        x = block(x)
    return model.transformer.ln_f(x)


def median_ms(seconds):
    return 1000 * statistics.median(seconds)


def part1(args, text, text_path, work):
    tokens_per_iter = BABY["batch_size"] * BABY["block_size"]
    dataset = "bench_pretrain_char"
    write_nanogpt_data(text, os.path.join(args.nanogpt, "data", dataset))
    runs = {"nanoGPT": [], "Pretraining.py": []}
    for r in range(args.repeats):  # alternate the order, so a change in the machine's load hits both
        order = ["Pretraining.py", "nanoGPT"] if r % 2 == 0 else ["nanoGPT", "Pretraining.py"]
        for who in order:
            out = os.path.join(work, f"{who}-{r}")
            print(f"  run {r + 1}/{args.repeats}: {who} ...", flush=True)
            if who == "nanoGPT":
                m = run_nanogpt(args.nanogpt, dataset, out, args.iters)
            else:
                m = run_ours(text_path, out, args.iters, ours_baby_args(args.iters))
            m["out"] = out
            m["load"] = os.getloadavg()[0]
            runs[who].append(m)
    print(f"\n=== Part 1: nanoGPT's baby GPT on CPU, {args.iters} iterations, {tokens_per_iter} tokens each, fp32 ===")
    print(f"{'script':15} {'run':>3} {'ms/iter (median)':>17} {'tokens/s':>9} {'wall s':>7} "
          f"{'val@' + str(args.iters):>9} {'load':>5}")
    for who, ms in runs.items():
        for i, m in enumerate(ms):
            med = median_ms(m["step_seconds"])
            print(f"{who:15} {i + 1:3} {med:17.2f} {tokens_per_iter / med * 1000:9,.0f} {m['wall_s']:7.1f} "
                  f"{m['val'].get(args.iters, float('nan')):9.4f} {m['load']:5.1f}")
    ours_ms = statistics.median([t for m in runs["Pretraining.py"] for t in m["step_seconds"]])
    nano_ms = statistics.median([t for m in runs["nanoGPT"] for t in m["step_seconds"]])
    wall = [statistics.mean(m["wall_s"] for m in runs[w]) for w in ("Pretraining.py", "nanoGPT")]
    vals = [statistics.mean(m["val"][args.iters] for m in runs[w]) for w in ("Pretraining.py", "nanoGPT")]
    print(f"tokens/s Pretraining.py / nanoGPT: {nano_ms / ours_ms:.2f}x (median iteration over all runs); "
          f"wall time {wall[0]:.1f} s vs {wall[1]:.1f} s ({wall[1] / wall[0]:.2f}x)")
    print(f"val loss at {args.iters} (each script's own 20-batch estimate, mean of runs): "
          f"Pretraining.py {vals[0]:.4f}, nanoGPT {vals[1]:.4f}")
    scores = [score_both(text, args.nanogpt, n["out"], o["out"])
              for n, o in zip(runs["nanoGPT"], runs["Pretraining.py"])]
    for i, (nano_loss, ours_loss, nano_iter, n_chars) in enumerate(scores):
        print(f"same held-out text ({n_chars:,} characters), run {i + 1}: Pretraining.py {ours_loss:.4f}, "
              f"nanoGPT {nano_loss:.4f} (its best checkpoint, iteration {nano_iter})")
    for who, ms in runs.items():
        print(f"val curve {who}, run 1:", ", ".join(f"{s}:{v:.3f}" for s, v in sorted(ms[0]["val"].items())))


# ----------------------------------------------------------------------------- part 2: precision at 124M
def gpt2_tokenizer_dir():
    for d in (os.path.join(ROOT, "model", "gpt2-base"), os.path.join(ROOT, "..", "shared", "gpt2-tokenizer")):
        if os.path.isfile(os.path.join(d, "vocab.json")) or os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    return None


def part2(args, text_path, work):
    tok_dir = gpt2_tokenizer_dir()
    tok_args = ["--tokenizer", tok_dir] if tok_dir else ["--tokenizer", "char"]
    shape = ["--size", "124M", "--block-size", 256, "--batch-size", 4, "--eval-steps", 0, "--eval-iters", 1,
             "--sample-tokens", 0, "--warmup-steps", 5, *tok_args]
    variants = [("fp32", ["--dtype", "fp32"]), ("bf16 autocast", ["--dtype", "bf16"]),
                ("bf16 master", ["--dtype", "bf16", "--master-weights"])]
    results, runs = {}, {name: [] for name, _ in variants}
    for r in range(args.repeats):  # alternate the order: fp32, autocast, master, then the reverse
        for name, extra in (variants if r % 2 == 0 else variants[::-1]):
            print(f"  124M {name}, run {r + 1}/{args.repeats}: {args.steps} steps ...", flush=True)
            out = os.path.join(work, f"124M-{name.replace(' ', '-')}-{r}")
            m = run_ours(text_path, out, args.steps, [*shape, *extra])
            m["load"] = os.getloadavg()[0]
            runs[name].append(m)
            results.setdefault(name, m)
    with open(os.path.join(work, "124M-fp32-0", "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    print(f"\n=== Part 2: one training step at GPT-2 124M's shape, batch 4 x 256, vocabulary {vocab:,} ===")
    print("(step times: the steps after the first two, of all runs; 'fastest' is the least disturbed by other work)")
    step_times = {name: [t for m in ms for t in m["step_seconds"][2:]] for name, ms in runs.items()}
    base, base_min = statistics.median(step_times["fp32"]), min(step_times["fp32"])
    print(f"{'precision':14} {'s/step median':>13} {'vs fp32':>8} {'fastest':>8} {'vs fp32':>8} {'peak RSS GB':>12} "
          f"{'loss@' + str(args.steps):>9}  load")
    for name, ts in step_times.items():
        med, fast = statistics.median(ts), min(ts)
        m = runs[name][0]
        print(f"{name:14} {med:13.3f} {base / med:7.2f}x {fast:8.3f} {base_min / fast:7.2f}x "
              f"{(m.get('peak_rss_mb') or float('nan')) / 1024:12.2f} {m['history']['train'][-1][1]:9.4f}  "
              + "/".join(f"{x['load']:.1f}" for x in runs[name]))
    losses = {name: [loss for _, loss in m["history"]["train"]] for name, m in results.items()}
    print("train loss per step (same weights at step 0, same batches):")
    print("step " + "".join(f"{name:>15}" for name in losses))
    for i in range(len(losses["fp32"])):
        if i < 5 or (i + 1) % 5 == 0:
            print(f"{i + 1:4} " + "".join(f"{losses[name][i]:15.4f}" for name in losses))
    for name in ("bf16 autocast", "bf16 master"):
        diff = [abs(a - b) for a, b in zip(losses[name], losses["fp32"])]
        print(f"{name} - fp32: max |difference| {max(diff):.4f}, mean over the last 10 steps "
              f"{statistics.mean(a - b for a, b in zip(losses[name][-10:], losses['fp32'][-10:])):+.4f}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, ls in losses.items():
            ax.plot(range(1, len(ls) + 1), ls, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.savefig(args.plot, dpi=100)
        print(f"loss curves plotted to {args.plot}")


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout (its train.py is run as it is)")
    p.add_argument("--text", help="corpus file (default: 1.1 MB of English Wikipedia from gensim's test data)")
    p.add_argument("--part", type=int, choices=[1, 2], help="run only this part")
    p.add_argument("--iters", type=int, default=2000, help="baby-GPT iterations (nanoGPT README: 2000)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each script (part 1) or precision (part 2), alternating")
    p.add_argument("--steps", type=int, default=16, help="training steps per precision in part 2")
    p.add_argument("--plot", help="save part 2's loss curves to this PNG")
    args = parse_args(p, argv)
    work = tempfile.mkdtemp(prefix="bench_pretrain_")
    if args.text:
        if not os.path.isfile(args.text):
            raise UserError(f"--text {args.text} is not a file: pass a text file, or leave --text out to use the "
                            "Wikipedia sample.")
        text_path = args.text
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
    else:
        text = wikipedia_sample(TINY_SHAKESPEARE_CHARS)
        text_path = os.path.join(work, "enwiki_sample.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write(text)
    print(f"Text: {args.text or 'English Wikipedia sample (gensim test data)'}, {len(text):,} characters, "
          f"{len(set(text))} distinct; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; outputs in {work}")
    if args.part in (None, 1):
        if args.nanogpt and os.path.isfile(os.path.join(args.nanogpt, "train.py")):
            part1(args, text, text_path, work)
        else:
            print("Part 1 skipped: pass --nanogpt DIR, a checkout of karpathy/nanoGPT (git clone it anywhere).")
    if args.part in (None, 2):
        part2(args, text_path, work)


if __name__ == "__main__":
    run_main(main)
