"""Task 5 (optional): pretrain a GPT-2 from scratch, on a laptop CPU or on many GPUs.

任务 5（选做）：从零预训练一个 GPT-2。模型是本仓库自己写的 gpt2/modeling_gpt2.py，
输出目录是标准的 Hugging Face 格式（save_pretrained），其他脚本和 transformers 都能直接加载。

What it does, top to bottom:
  1. reads text files / JSONL (`--data`, default data/pretrain/), builds or loads a tokenizer
     (GPT-2's from model/gpt2-base, or a byte-level BPE / a character vocabulary trained on your corpus),
     tokenizes everything once into a cached memmap (`<out>/data/`) and splits it into train / val;
  2. builds a GPT2Config (`--size tiny|baby|small|124M` or explicit --n-layer/--n-head/--n-embd/--block-size);
  3. trains with AdamW (fused; weight decay only on matrices), warmup + cosine decay, gradient accumulation,
     gradient clipping, bf16/fp16 autocast (or bf16 weights + fp32 master copy), optional torch.compile;
  4. every --eval-steps steps: val loss, a generated sample, a checkpoint (`<out>/ckpt.pt`, written
     atomically) and the loss curve (`<out>/loss_curve.png`); `--resume` continues after a crash;
  5. at the end: `save_pretrained` model + tokenizer in `--out`, and `metrics.json`.

Run it:
  python Pretraining.py --data data/samples --tokenizer char --size tiny --max-steps 200 --out out/pretrain-demo
  python Pretraining.py --data "corpus/*.txt" --tokenizer bpe --vocab-size 8000 --size small --out model/gpt2-zh
  torchrun --nproc_per_node 4 Pretraining.py --size 124M --tokenizer gpt2 --grad-accum 8 --out model/gpt2-mine
  python Pretraining.py ... --resume          # continue from <out>/ckpt.pt after an interruption

Under torchrun every process trains on its own share of each global batch (DDP: gloo on CPU, NCCL on
GPU); only rank 0 prints, evaluates and saves. `python Pretraining.py --help` lists every option.
"""
import argparse
import contextlib
import copy
import dataclasses
import glob
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from course_utils import (
    DTYPE_CHOICES,
    ArgumentParser,
    UserError,
    atomic_path,
    cpu_supports_bf16,
    gpt2_model_class,
    keep_freed_memory,
    parse_args,
    pick_device,
    pick_dtype,
    plot_losses,
    run_main,
    script_dir,
    use_fused_gelu,
)

ROOT = script_dir(globals())  # for the default paths: data/pretrain/, model/gpt2-base, model/gpt2-pretrained
EOS = "<|endoftext|>"  # GPT-2's document separator; our own tokenizers reuse the same string

# Model presets. "baby" is nanoGPT's CPU setting for Shakespeare, "small" its GPU one, "124M" is GPT-2.
SIZES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=64, block_size=128),     # ~0.2M parameters + embeddings
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),     # ~0.8M
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),   # ~10.6M
    "124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 small
}


# ----------------------------------------------------------------------------- arguments
def build_parser():
    p = ArgumentParser(description="Pretrain a GPT-2 from scratch (Task 5).")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=[os.path.join(ROOT, "data", "pretrain")],
                   help="text / JSONL files, directories or globs (default: data/pretrain/)")
    g.add_argument("--text-field", default="text", help="JSONL key holding the text (default: text)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="last part of the token stream kept for validation")
    g.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 (from --tokenizer-path), bpe (trained on the corpus), char, or a tokenizer directory")
    g.add_argument("--tokenizer-path", default=os.path.join(ROOT, "model", "gpt2-base"))
    g.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size for --tokenizer bpe")
    g = p.add_argument_group("model")
    g.add_argument("--size", choices=list(SIZES), default="tiny", help="preset, overridden by the four options below")
    g.add_argument("--n-layer", type=int)
    g.add_argument("--n-head", type=int)
    g.add_argument("--n-embd", type=int)
    g.add_argument("--block-size", type=int, help="context length in tokens")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--activation", choices=["gelu", "gelu_new"], default="gelu",
                   help="gelu = exact GELU, as nanoGPT (default: its CPU kernel is 2-4x faster); "
                        "gelu_new = GPT-2's tanh approximation")
    g.add_argument("--model-impl", choices=["repo", "transformers"], default="repo",
                   help="repo = gpt2/modeling_gpt2.py (Task 4); transformers = the library's GPT-2")
    g = p.add_argument_group("training")
    g.add_argument("--out", default=os.path.join(ROOT, "model", "gpt2-pretrained"), help="output directory")
    g.add_argument("--max-steps", type=int, default=2000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=12, help="sequences per micro-batch (per process)")
    g.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per optimizer step, over all processes (default: one per process)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3, 6e-4 from 768 wide)")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr/10)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: min(100, max_steps/10)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.99)
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 turns clipping off")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="precision (auto: GPU bf16, else fp16; CPU bf16 from 256 wide if it has bf16 units, else fp32)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--master-weights", action="store_true",
                   help="CPU bf16: bf16 weights with an fp32 master copy instead of autocast (same losses; "
                        "a few percent faster at GPT-2 124M, within run-to-run noise: see the README)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (needs a C++ compiler on CPU)")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    g = p.add_argument_group("logging")
    g.add_argument("--eval-steps", type=int, default=250,
                   help="steps between val loss + checkpoint (0: only at the end)")
    g.add_argument("--eval-iters", type=int, default=20, help="val batches per evaluation")
    g.add_argument("--save-steps", type=int, default=None, help="steps between checkpoints (default: --eval-steps)")
    g.add_argument("--sample-tokens", type=int, default=64, help="length of the sample printed at each eval (0: none)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="hardware peak for MFU (default: known GPUs by name; CPU 2.0 bf16 / 0.28 fp32, "
                        "this course's 2-core CPU)")
    g.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_alias("--eval-interval", dest="eval_steps", type=int)  # the old names, accepted but not in --help
    p.add_alias("--save-interval", dest="save_steps", type=int)
    return p


# ----------------------------------------------------------------------------- processes and devices
def log(*args, **kwargs):
    """print, in the first process only: under torchrun every process runs this script."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


def setup_distributed(args):
    """One process, or one of N started by torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(args.device)
    if device == "cuda":  # set_device and DDP need the index: each torchrun process takes its own GPU
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere and newer)
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        import torch.distributed as dist
        # NCCL moves gradients GPU-to-GPU; gloo is the CPU backend.
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device == "cpu":  # the processes share the cores: don't let each one spawn a thread per core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return rank, world, device


def choose_dtype(args, device, n_embd):
    """--dtype: on a CPU, bf16 pays off only where the CPU has bf16 units (AVX512-BF16 / AMX) and the matrices
    are wide enough to hide the casts (bench/bench_pretrain.py measures it), so auto keeps small models fp32."""
    has_bf16 = cpu_supports_bf16()
    if args.dtype == "bf16" and not device.startswith("cuda") and not has_bf16:
        log("Note: this CPU has no bf16 units (AVX512-BF16/AMX): bf16 runs emulated, many times slower than "
            "fp32 (--dtype auto picks fp32 here).")
    return pick_dtype(args.dtype, device, cpu_bf16=has_bf16 and n_embd >= 256)


def peak_flops(args, device, dtype):
    """Peak FLOP/s of the hardware, the denominator of MFU (model FLOPs utilisation)."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989, "H100": 989, "A100": 312, "L4": 121, "A10": 125, "V100": 125, "T4": 65}
        return next((v for k, v in table.items() if k in name), 312) * 1e12 * (1 if dtype != "fp32" else 0.5)
    return (2.0e12 if dtype == "bf16" else 0.28e12)  # measured on the course's 2-core CPU (AMX bf16 / AVX-512 fp32)


# ----------------------------------------------------------------------------- data files
def find_files(patterns):
    """Expand --data into a sorted list of .txt / .jsonl / .json files (directories are searched recursively)."""
    files = []
    for pat in patterns:
        if os.path.isdir(pat):
            for dirpath, _, names in os.walk(pat):
                files += [os.path.join(dirpath, n) for n in names if n.endswith((".txt", ".jsonl", ".json", ".md"))]
        else:
            files += [f for f in glob.glob(pat) if os.path.isfile(f)]
    return sorted(set(files))


def read_lines(path, bar=None):
    """Yield lists of raw lines, about 1 MB at a time (a corpus larger than memory still works).

    A .json file that holds one JSON list is read whole and gives one line per record.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"Cannot read {path} ({e.strerror}): check the path and its permissions, "
                        "or leave it out of --data.")
    with f:
        if path.endswith(".json") and f.read(1) == b"[":
            f.seek(0)
            try:
                records = json.load(f)
            except ValueError as e:
                raise UserError(f"{path} starts like a JSON list but is not valid JSON ({e}): "
                                "fix it or convert it to JSONL.")
            if bar is not None:
                bar.update(os.path.getsize(path))
            yield [json.dumps(r, ensure_ascii=False).encode() for r in records]
            return
        f.seek(0)
        while True:
            lines = f.readlines(1 << 20)
            if not lines:
                return
            if bar is not None:
                bar.update(sum(map(len, lines)))
            yield lines


def iter_documents(files, text_field, stats=None, bar=None):
    """Yield pieces of text; None marks the end of a document (where an end-of-text token goes).

    A text file is one document. JSONL gives one document per line (the --text-field value, or the line
    itself if it is a JSON string); a line that is not JSON or has no text is counted and skipped.
    """
    for path in files:
        is_jsonl = path.endswith((".jsonl", ".json"))
        for lines in read_lines(path, bar):
            if not is_jsonl:
                yield b"".join(lines).decode("utf-8", errors="replace")
                continue
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record if isinstance(record, str) else record[text_field]
                    if not isinstance(text, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError, IndexError):
                    if stats is not None:
                        stats["bad_records"] = stats.get("bad_records", 0) + 1
                    continue
                if text:
                    yield text
                    yield None
        if not is_jsonl:
            yield None


# ----------------------------------------------------------------------------- tokenizers
def wrap_tokenizer(tok, block_size):
    """Turn a `tokenizers.Tokenizer` into a transformers tokenizer that save_pretrained / AutoTokenizer handle."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, model_max_length=block_size)


def train_char_tokenizer(files, text_field, block_size):
    """One token per character that occurs in the corpus, plus <|endoftext|> (id 0) and <|unk|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    chars = set()
    for piece in iter_documents(files, text_field):
        if piece:
            chars.update(piece)
    vocab = {EOS: 0, "<|unk|>": 1}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char a "word"
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    tok.add_special_tokens([EOS])
    return wrap_tokenizer(tok, block_size)


def train_bpe_tokenizer(files, text_field, vocab_size, block_size):
    """GPT-2 style byte-level BPE learned from the corpus: no unknown tokens, and it suits Chinese text too."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator((t for t in iter_documents(files, text_field) if t), vocab_size=vocab_size,
                            min_frequency=2, special_tokens=[EOS], show_progress=False)
    return wrap_tokenizer(bpe._tokenizer, block_size)


def load_tokenizer(args, files, block_size):
    from transformers import AutoTokenizer
    if args.tokenizer == "char":
        print("Training a character tokenizer on the corpus ...")
        return train_char_tokenizer(files, args.text_field, block_size)
    if args.tokenizer == "bpe":
        print(f"Training a byte-level BPE tokenizer (vocab {args.vocab_size}) on the corpus ...")
        return train_bpe_tokenizer(files, args.text_field, args.vocab_size, block_size)
    path = args.tokenizer_path if args.tokenizer == "gpt2" else args.tokenizer
    if os.path.isdir(path):
        tok = AutoTokenizer.from_pretrained(path)
    elif args.tokenizer == "gpt2":
        try:
            print(f"{path} not found, downloading GPT-2's tokenizer from the hub ...")
            tok = AutoTokenizer.from_pretrained("gpt2")
        except Exception:
            raise UserError(f"No GPT-2 tokenizer at {path} and no hub access: download 'gpt2' into that directory "
                            "(see model/README.md), or train one on your data with --tokenizer bpe or "
                            "--tokenizer char.")
    else:
        raise UserError(f"--tokenizer {path}: no such directory (use gpt2, bpe, char or a tokenizer directory).")
    if tok.eos_token_id is None:
        raise UserError(f"The tokenizer in {path} has no end-of-text token; use --tokenizer bpe or char.")
    tok.model_max_length = block_size
    return tok


# ----------------------------------------------------------------------------- tokenize once, into a memmap
def fingerprint(args, files):
    """Everything the cached tokens depend on; a change (a new file, another tokenizer) re-tokenizes."""
    return {"files": [[os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))] for f in files],
            "tokenizer": args.tokenizer, "tokenizer_path": os.path.abspath(args.tokenizer_path),
            "vocab_size": args.vocab_size if args.tokenizer == "bpe" else None,
            "text_field": args.text_field, "val_fraction": args.val_fraction}


def prepare_data(args, files, block_size):
    """Build (or reuse) <out>/data/tokens.bin and the tokenizer saved in <out>. Runs on rank 0 only."""
    cache = os.path.join(args.out, "data")
    meta_path = os.path.join(cache, "meta.json")
    fp = fingerprint(args, files)
    if os.path.exists(meta_path) and os.path.exists(os.path.join(args.out, "tokenizer_config.json")):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("fingerprint") == fp:
            print(f"Using the tokenized corpus cached in {cache} ({meta['n_tokens']:,} tokens).")
            return
    os.makedirs(cache, exist_ok=True)
    tok = load_tokenizer(args, files, block_size)
    dtype = np.uint16 if len(tok) <= 65535 else np.uint32
    # Atomic: a run killed while tokenizing, or a corpus too short, leaves no half-written tokens.bin behind.
    with atomic_path(os.path.join(cache, "tokens.bin")) as tmp:
        n_tokens = write_tokens(tmp, tok, files, args, dtype)
        n_val = int(n_tokens * args.val_fraction)
        if n_tokens - n_val < block_size + 2 or n_val < block_size + 2:
            raise UserError(f"The corpus has only {n_tokens} tokens, too few for a block size of {block_size} "
                            f"with a {args.val_fraction:.0%} validation split: add text or lower --block-size.")
    tok.save_pretrained(args.out)
    with open(meta_path, "w") as f:
        json.dump({"fingerprint": fp, "n_tokens": n_tokens, "n_train": n_tokens - n_val,
                   "dtype": np.dtype(dtype).name, "vocab_size": len(tok)}, f, indent=1)
    print(f"Tokenized {len(files)} file(s): {n_tokens:,} tokens ({n_tokens - n_val:,} train, {n_val:,} val), "
          f"vocabulary {len(tok):,}.")


def write_tokens(path, tok, files, args, dtype):
    """Tokenize the corpus into `path`: one flat array of token ids, an end-of-text token after each document."""
    from tqdm.auto import tqdm
    eos, encoder = tok.eos_token_id, tok.backend_tokenizer
    stats, n_tokens, batch = {}, 0, []
    total = sum(os.path.getsize(f) for f in files)
    with open(path, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                                       disable=args.no_progress) as bar:
        def flush():
            nonlocal n_tokens, batch
            encoded = encoder.encode_batch([t for t in batch if t is not None], add_special_tokens=False)
            # Re-insert end-of-text tokens where documents ended.
            it, flat = (enc.ids for enc in encoded), []
            for t in batch:
                flat += [eos] if t is None else next(it)
            np.asarray(flat, dtype=dtype).tofile(out)
            n_tokens += len(flat)
            batch = []
        for piece in iter_documents(files, args.text_field, stats, bar):
            batch.append(piece)
            if len(batch) >= 256:
                flush()
        flush()
    if stats.get("bad_records"):
        print(f"Skipped {stats['bad_records']} JSON records that were not JSON or had no '{args.text_field}' string.")
    return n_tokens


def load_data(out):
    with open(os.path.join(out, "data", "meta.json")) as f:
        meta = json.load(f)
    tokens = np.memmap(os.path.join(out, "data", "tokens.bin"), dtype=meta["dtype"], mode="r")
    return tokens[: meta["n_train"]], tokens[meta["n_train"]:], meta


def get_batch(data, offsets, block_size, device):
    """x = block_size tokens from each offset, y = the same shifted by one: predict every next token."""
    x = torch.from_numpy(np.stack([data[o: o + block_size] for o in offsets]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[o + 1: o + 1 + block_size] for o in offsets]).astype(np.int64))
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def step_offsets(seed, step, n, grad_accum, batch_size, block_size):
    """Random start positions for ALL micro-batches of one optimizer step, shape (grad_accum, batch_size).

    They depend only on (seed, step): a resumed run sees exactly the data it would have seen, and N processes
    together see exactly the sequences one process would (process r takes micro-batches r, r+N, r+2N, ...).
    """
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n - block_size - 1, size=(grad_accum, batch_size))


# ----------------------------------------------------------------------------- model and optimizer
def use_fast_cpu_bf16_attention(model, device, dtype, block_size):
    """On a CPU in bf16, PyTorch's fused attention kernel (scaled_dot_product_attention) has a slow backward; for
    blocks up to 512 tokens the model's textbook path ("eager": q·kᵀ, softmax, ·v as bf16 matrix products) is
    faster. Measured at 124M, batch 4 x 256 on the course's 2-core CPU: 1.18 s instead of 1.25 s a step; at 2 x 512
    1.35 s instead of 1.41 s; at 1 x 1024 slower (1.56 s instead of 1.43 s), so longer blocks keep the fused kernel.
    The same formula: tests/test_pretraining.py checks its logits and gradients against the fused kernel's."""
    if device == "cpu" and dtype == "bf16" and block_size <= 512:
        model.set_attn_implementation("eager")


class MasterWeights:
    """bf16 weights for the forward and backward passes, fp32 master weights for the optimizer.

    On a CPU, autocast keeps the weights in fp32 and casts every one of them to bf16 at every forward, and the
    gradients back to fp32: at GPT-2's size those casts cost as much as the bf16 matrix products themselves.
    Here the model that computes is a bf16 copy; after each backward its gradients are added (in fp32) to
    the fp32 model's, the optimizer updates the fp32 model, and its new weights are rounded into the copy.
    The fp32 model is what is checkpointed and saved, so resume and the output directory are unchanged.
    Measured at GPT-2 124M, batch 4 x 256 (bench/bench_pretrain.py): 2-5% faster than autocast in the alternating
    runs (1.20 vs 1.23 s on an AMX Xeon, 1.62 vs 1.69 s on an AVX512-BF16 EPYC), slower in a single one (1.87 vs 1.78
    s), and it holds a second copy of the weights: an option (--master-weights), not the default.
    """

    def __init__(self, model, dtype=torch.bfloat16):
        self.master = model
        self.compute = copy.deepcopy(model).to(dtype)  # deepcopy keeps lm_head tied to wte
        self.pairs = list(zip(self.master.parameters(), self.compute.parameters()))

    @torch.no_grad()
    def collect_grads(self):
        """Move the bf16 gradients of the last backward into the fp32 master gradients (summing micro-batches)."""
        for master, low in self.pairs:
            if low.grad is None:
                continue
            if master.grad is None:
                master.grad = low.grad.float()
            else:
                master.grad += low.grad
            low.grad = None

    @torch.no_grad()
    def copy_to_compute(self):
        for master, low in self.pairs:
            low.copy_(master)


class CrossEntropyCPU(torch.autograd.Function):
    """F.cross_entropy(logits, targets), the mean over all positions, with its gradient computed in the forward.

    On a CPU, PyTorch's log_softmax backward over GPT-2's 50,257-word vocabulary is slow: at 124M, batch 4 x 256
    in bf16 it took 0.4 s of a 2.0 s step, plus 0.3 s to cast the logits to fp32 and to fill a zero gradient for
    nll_loss. Here the log-softmax (in fp32), the loss (minus the target's log-probability) and the gradient
    (softmax - one_hot) / N are computed a few rows at a time, while those rows are in the CPU's cache (measured for
    all 1024 rows: 84 ms in bf16 and 93 ms in fp32, instead of 206 ms), and the gradient is kept in the logits'
    dtype (bf16 has fp32's range). Only for a CPU (fp32 or bf16): fp16 logits under a GradScaler would underflow,
    and CUDA's kernels are fast. tests/test_pretraining.py checks the loss and the gradient against F.cross_entropy."""

    CHUNK = 8 * 50257  # logits per pass: 1.6 MB in fp32, within a core's L2 cache (a small vocabulary: all rows)

    @staticmethod
    def forward(ctx, logits, targets):
        flat, t = logits.view(-1, logits.size(-1)), targets.view(-1)
        n, vocab = flat.shape
        rows = max(1, CrossEntropyCPU.CHUNK // vocab)
        grad = torch.empty_like(flat)
        total = torch.zeros(())
        for s in range(0, n, rows):
            target = t[s:s + rows]
            log_probs = torch.log_softmax(flat[s:s + rows], dim=-1, dtype=torch.float32)
            total -= log_probs.gather(1, target[:, None]).sum()
            out = torch.mul(log_probs.exp_(), 1.0 / n, out=grad[s:s + rows])  # softmax / N, in the logits' dtype
            out[torch.arange(len(target)), target] -= 1.0 / n
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad, = ctx.saved_tensors
        if grad_loss.item() != 1:  # 1 / grad-accum, or a loss scale; 1 most of the time: no pass over the logits
            grad = grad * grad_loss.to(grad.dtype)
        return grad.view(ctx.shape), None


def lm_loss(logits, targets):
    """The mean next-token cross-entropy of a training step (see CrossEntropyCPU)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16):
        return CrossEntropyCPU.apply(logits, targets)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def build_config(args, vocab_size, eos_id):
    from transformers import GPT2Config
    shape = dict(SIZES[args.size])
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    if shape["n_embd"] % shape["n_head"]:
        raise UserError(f"--n-embd {shape['n_embd']} must be a multiple of --n-head {shape['n_head']}.")
    # bos/eos must be our tokenizer's end-of-text id: a small GPT2Config would otherwise keep 50256.
    return GPT2Config(vocab_size=vocab_size, n_positions=shape["block_size"], n_embd=shape["n_embd"],
                      n_layer=shape["n_layer"], n_head=shape["n_head"], activation_function=args.activation,
                      resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                      bos_token_id=eos_id, eos_token_id=eos_id)


def configure_optimizer(model, args, device):
    """AdamW; weight decay only for matrices (linear weights, embeddings), not for biases and LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied lm_head/wte appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each tensor in one pass (GPU and CPU); the CPU default is a loop of ~10
    # element-wise operations per parameter tensor.
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=True)


def get_lr(step, args):
    """Linear warmup, then cosine decay from lr to min_lr at the last step (nanoGPT / GPT-3 schedule)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (args.lr - args.min_lr)


def flops_per_token(config):
    """6N for the weights (forward + backward) plus 12·L·H·Q·T for attention (PaLM appendix B, nanoGPT)."""
    n = config.n_layer * 12 * config.n_embd ** 2 + config.vocab_size * config.n_embd  # matrices + tied head
    return 6 * n + 12 * config.n_layer * config.n_embd * config.n_positions


@torch.no_grad()
def estimate_loss(model, data, args, block_size, device, autocast):
    """Mean loss over the same --eval-iters val batches every time, so evaluations are comparable."""
    model.eval()
    rng = np.random.default_rng([args.seed, 999_999_999])
    losses = []
    for _ in range(args.eval_iters):
        x, y = get_batch(data, rng.integers(0, len(data) - block_size - 1, size=args.batch_size), block_size, device)
        with autocast:
            logits = model(input_ids=x, use_cache=False).logits
        losses.append(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)).item())
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def sample_text(model, tok, n_tokens, block_size, device):
    """A short generation from an end-of-text prompt, so you can watch the model learn."""
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(0)
        prompt = torch.tensor([[tok.eos_token_id]], device=device)
        out = model.generate(prompt, max_new_tokens=min(n_tokens, block_size - 1), do_sample=True, top_k=50,
                             pad_token_id=tok.eos_token_id, eos_token_id=None)
    model.train()
    return tok.decode(out[0, 1:], skip_special_tokens=False)


def peak_rss_mb():
    """This process's peak resident memory (Linux and macOS report it in different units; Windows not at all)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# ----------------------------------------------------------------------------- the run: what its steps share
@dataclasses.dataclass
class Run:
    """Everything the training steps share; build_run makes it, main() calls the steps in order."""
    args: argparse.Namespace
    rank: int  # this process: 0 .. world-1 (0 without torchrun); rank 0 prints, evaluates and saves
    world: int  # the number of processes
    device: str
    config: object  # the model's GPT2Config
    block_size: int
    dtype: str  # "fp32", "bf16" or "fp16"
    raw_model: torch.nn.Module  # the fp32 model: the optimizer updates it, checkpoints and save_pretrained save it
    eval_model: torch.nn.Module  # the model that runs forward passes (with --master-weights: its bf16 copy)
    model: torch.nn.Module  # eval_model as it trains: compiled with --compile, wrapped in DDP under torchrun
    mixed: object  # the MasterWeights with --master-weights, else None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object  # torch.autocast for bf16 / fp16, else a context that does nothing
    history: dict  # "train" and "val": lists of (step, loss); "grad_norm": one per step
    start_step: int  # 0, or the checkpoint's step with --resume
    flops_per_token: float
    peak_flops: float  # of all devices together, since tokens/s counts the tokens of all processes

    @property
    def master(self):
        return self.rank == 0

    @property
    def ddp(self):
        return self.world > 1

    @property
    def tokens_per_step(self):
        return self.args.grad_accum * self.args.batch_size * self.block_size

    def mfu(self, tokens_per_s):
        return self.flops_per_token * tokens_per_s / self.peak_flops


# ----------------------------------------------------------------------------- the steps of a run, in order
def load_checkpoint(args):
    """With --resume: <out>/ckpt.pt, or None when there is none yet."""
    if not args.resume:
        return None
    path = checkpoint_path(args)
    if not os.path.exists(path):
        log(f"No checkpoint at {path}: starting from scratch.")
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    log(f"Resuming from {path} at step {checkpoint['step']}.")
    return checkpoint


def checkpoint_path(args):
    return os.path.join(args.out, "ckpt.pt")


def load_corpus(args, rank, world, checkpoint):
    """The tokenizer, the train and val token streams, and the block size.

    Rank 0 tokenizes (or finds the cache); the other processes wait for it, then read the same files."""
    from transformers import AutoTokenizer
    files = find_files(args.data)
    if not files:
        raise UserError(f"No .txt/.jsonl files found at {' '.join(args.data)}: put your corpus in data/pretrain/ "
                        "(or pass --data PATH_OR_GLOB; data/samples/ has a small example).")
    block_size = args.block_size or SIZES[args.size]["block_size"]
    if checkpoint:
        block_size = checkpoint["config"]["n_positions"]
    error = None
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        try:
            prepare_data(args, files, block_size)
        except UserError as e:
            error = str(e)
    if world > 1:  # the others wait here for the corpus, and learn whether rank 0 failed (else they would hang)
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
    tok = AutoTokenizer.from_pretrained(args.out)
    train_data, val_data, meta = load_data(args.out)
    if min(len(train_data), len(val_data)) < block_size + 2:
        raise UserError(f"The cached corpus ({meta['n_tokens']} tokens) is too short for a block size of {block_size}: "
                        "add text or lower --block-size.")
    return tok, train_data, val_data, block_size


def model_config(args, tok, checkpoint):
    """A new GPT2Config from --size and friends, or the checkpoint's (which must fit the tokenizer)."""
    from transformers import GPT2Config
    if not checkpoint:
        return build_config(args, len(tok), tok.eos_token_id)
    config = GPT2Config.from_dict(checkpoint["config"])
    if config.vocab_size != len(tok):
        raise UserError(f"{checkpoint_path(args)} was trained with a vocabulary of {config.vocab_size}, but the "
                        f"tokenizer now has {len(tok)}: resume with the same --data and --tokenizer, "
                        "or use a new --out.")
    return config


def fill_in_defaults(args, n_embd, world):
    """The defaults that depend on the model's width, the number of steps or the number of processes."""
    args.lr = args.lr or (1e-3 if n_embd < 768 else 6e-4)
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.warmup_steps = min(100, args.max_steps // 10) if args.warmup_steps is None else args.warmup_steps
    args.grad_accum = args.grad_accum or world
    if args.grad_accum % world:
        raise UserError(f"--grad-accum {args.grad_accum} counts the micro-batches of one step over all processes: "
                        f"make it a multiple of the number of processes ({world}).")


def build_run(args, config, block_size, rank, world, device, checkpoint):
    """The model, its precision and its optimizer (restored from the checkpoint with --resume)."""
    torch.manual_seed(args.seed)  # same initial weights on every rank
    raw_model = gpt2_model_class(args.model_impl)(config).to(device)
    use_fused_gelu(raw_model)
    dtype = choose_dtype(args, device, config.n_embd)
    use_fast_cpu_bf16_attention(raw_model, device, dtype, block_size)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    # --master-weights (CPU bf16): a bf16 copy computes, the fp32 model is updated (MasterWeights); else autocast.
    master_weights = dtype == "bf16" and device == "cpu" and args.master_weights
    autocast = (torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=amp_dtype)
                if amp_dtype and not master_weights else contextlib.nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")  # fp16 needs loss scaling, bf16 does not
    optimizer = configure_optimizer(raw_model, args, device)
    history, start_step = {"train": [], "val": [], "grad_norm": []}, 0
    if checkpoint:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        history, start_step = checkpoint["history"], checkpoint["step"]
    mixed = MasterWeights(raw_model) if master_weights else None
    eval_model = mixed.compute if mixed else raw_model  # the model that runs forward passes
    model = torch.compile(eval_model) if args.compile else eval_model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
    return Run(args=args, rank=rank, world=world, device=device, config=config, block_size=block_size, dtype=dtype,
               raw_model=raw_model, eval_model=eval_model, model=model, mixed=mixed, optimizer=optimizer,
               scaler=scaler, autocast=autocast, history=history, start_step=start_step,
               flops_per_token=flops_per_token(config), peak_flops=peak_flops(args, device, dtype) * world)


def describe(run):
    args, config = run.args, run.config
    n_params = sum(p.numel() for p in run.raw_model.parameters())
    log(f"Model: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, block {run.block_size}, "
        f"vocabulary {config.vocab_size}: {n_params / 1e6:.2f}M parameters ({args.model_impl} implementation).")
    log(f"Training on {run.device} x{run.world} ({run.dtype}), {run.tokens_per_step:,} tokens per step "
        f"({args.grad_accum} micro-batches of {args.batch_size}x{run.block_size}), {args.max_steps} steps.")


def train_loop(run, tok, train_data, val_data):
    """The steps from start_step to --max-steps; rank 0 evaluates and checkpoints on the way.
    Returns the time of every step and the tokens/s after the first two (which include one-off costs)."""
    from tqdm.auto import tqdm
    args, history = run.args, run.history
    save_every = args.save_steps or args.eval_steps
    bar = tqdm(total=args.max_steps, initial=run.start_step, disable=not run.master or args.no_progress,
               dynamic_ncols=True, mininterval=1.0)
    timed_tokens, timed_seconds, t_last_log, step_seconds = 0, 0.0, time.perf_counter(), []
    run.model.train()
    for step in range(run.start_step, args.max_steps):
        t0 = time.perf_counter()
        train_loss, grad_norm, lr = train_step(run, step, train_data)
        history["train"].append((step + 1, train_loss))
        history["grad_norm"].append(grad_norm)
        dt = time.perf_counter() - t0
        step_seconds.append(dt)
        if step - run.start_step >= 2:  # the first steps include one-off warm-up costs (allocations, compile)
            timed_tokens, timed_seconds = timed_tokens + run.tokens_per_step, timed_seconds + dt
        tok_s = run.tokens_per_step / dt
        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", norm=f"{grad_norm:.2f}", tok_s=f"{tok_s:,.0f}",
                        mfu=f"{run.mfu(tok_s):.1%}", refresh=False)
        bar.update(1)
        if args.no_progress and run.master and time.perf_counter() - t_last_log > 10:
            print(f"step {step + 1}/{args.max_steps} loss {train_loss:.4f} lr {lr:.2e} norm {grad_norm:.2f} "
                  f"{tok_s:,.0f} tok/s MFU {run.mfu(tok_s):.1%}", flush=True)
            t_last_log = time.perf_counter()
        done = step + 1
        if run.master and args.eval_steps and done % args.eval_steps == 0 and done < args.max_steps:
            evaluate(run, done, tok, val_data)
        if run.master and save_every and done % save_every == 0 and done < args.max_steps:
            save_checkpoint(run, done)
    bar.close()
    return step_seconds, timed_tokens / timed_seconds if timed_seconds else float("nan")


def train_step(run, step, train_data):
    """One optimizer step: this rank's micro-batches of the step's global batch, forward and backward, then AdamW.
    Returns the loss of the whole global batch, the gradient norm and the learning rate."""
    args, optimizer, scaler, mixed, world = run.args, run.optimizer, run.scaler, run.mixed, run.world
    lr = get_lr(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    offsets = step_offsets(args.seed, step, len(train_data), args.grad_accum, args.batch_size, run.block_size)
    # Dropout masks from (seed, rank, step) alone: different on every rank, the same after a --resume.
    # (hash() of a tuple of ints is the same in every process; only str hashes change per run.)
    torch.manual_seed(hash((args.seed, run.rank, step)) % 2**63)
    loss_sum = torch.zeros((), device=run.device)
    accum_local = args.grad_accum // world  # this rank's micro-batches
    for micro in range(accum_local):
        x, y = get_batch(train_data, offsets[run.rank + micro * world], run.block_size, run.device)
        # DDP averages gradients across ranks during backward; skip that on all but the last micro-step.
        # (With bf16 master weights every micro-step syncs: its gradients leave the bf16 model at once,
        # to be summed in fp32.)
        sync = micro == accum_local - 1 or mixed is not None
        with (run.model.no_sync() if run.ddp and not sync else contextlib.nullcontext()):
            with run.autocast:
                logits = run.model(input_ids=x, use_cache=False).logits  # no KV cache: nothing is generated
            loss = lm_loss(logits, y) / accum_local
            scaler.scale(loss).backward()
        if mixed:
            mixed.collect_grads()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)  # fp16: back to true gradients before measuring them (a no-op otherwise)
    # The gradient norm is worth watching (spikes announce trouble); with --grad-clip 0 it is only measured.
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), args.grad_clip or float("inf")).item()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if mixed:
        mixed.copy_to_compute()
    if run.ddp:  # the loss of the whole global batch, for the log (gloo has no AVG: sum, then divide)
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= world
    return loss_sum.item(), grad_norm, lr


def evaluate(run, step, tok, val_data):
    """Rank 0: the val loss at `step` (and a generated sample), added to the history and to the loss curve."""
    from tqdm.auto import tqdm
    args = run.args
    val = estimate_loss(run.eval_model, val_data, args, run.block_size, run.device, run.autocast)
    run.history["val"].append((step, val))
    msg = f"step {step}: val loss {val:.4f}"
    if args.sample_tokens:
        sample = sample_text(run.eval_model, tok, args.sample_tokens, run.block_size, run.device)
        msg += "\n--- sample ---\n" + sample + "\n---"
    tqdm.write(msg)
    plot_losses(os.path.join(args.out, "loss_curve.png"), run.history["train"], run.history["val"],
                ylabel="loss (nats/token)")
    return val


def save_checkpoint(run, step):
    """<out>/ckpt.pt: everything --resume needs to continue after `step` as if the run had never stopped."""
    # No random-number states: the data (step_offsets) and the dropout masks (seeded per step in train_step)
    # depend only on the step, so a resumed run repeats exactly what the uninterrupted one would have done.
    state = {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict(), "step": step, "history": run.history,
             "config": run.config.to_dict(), "args": vars(run.args)}
    with atomic_path(checkpoint_path(run.args)) as tmp:  # a kill during the save leaves the previous one intact
        torch.save(state, tmp)


def save_outputs(run, tok, val_data, step_seconds, tokens_per_s):
    """Rank 0, at the end: the final evaluation and checkpoint, the Hugging Face directory, metrics.json."""
    args, history, model = run.args, run.history, run.raw_model
    trained = run.start_step < args.max_steps or not history["val"]  # else: resumed a run that had finished
    val = evaluate(run, args.max_steps, tok, val_data) if trained else history["val"][-1][1]
    save_checkpoint(run, args.max_steps)
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    metrics = {"final_train_loss": history["train"][-1][1] if history["train"] else None, "final_val_loss": val,
               "tokens_per_s": tokens_per_s, "mfu": run.mfu(tokens_per_s), "peak_flops": run.peak_flops,
               "dtype": run.dtype, "device": run.device, "world_size": run.world,
               "n_params": sum(p.numel() for p in model.parameters()), "steps": args.max_steps,
               "tokens_per_step": run.tokens_per_step, "step_seconds": step_seconds,
               "peak_rss_mb": peak_rss_mb(), "history": history}
    with atomic_path(os.path.join(args.out, "metrics.json")) as tmp, open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"Done: val loss {val:.4f}, {tokens_per_s:,.0f} tokens/s, MFU {metrics['mfu']:.1%}. "
          f"Saved to {args.out} (GPT2LMHeadModel.from_pretrained / AutoTokenizer.from_pretrained load it).")


def main(argv=None):
    args = parse_args(build_parser(), argv)
    try:
        rank, world, device = setup_distributed(args)
        if device == "cpu":
            keep_freed_memory()  # each step reuses the last step's memory (course_utils says why)
        checkpoint = load_checkpoint(args)
        tok, train_data, val_data, block_size = load_corpus(args, rank, world, checkpoint)
        config = model_config(args, tok, checkpoint)
        fill_in_defaults(args, config.n_embd, world)
        run = build_run(args, config, block_size, rank, world, device, checkpoint)
        del checkpoint  # its copy of the weights and of the optimizer state: free the memory before training
        describe(run)
        step_seconds, tokens_per_s = train_loop(run, tok, train_data, val_data)
        if run.master:
            save_outputs(run, tok, val_data, step_seconds, tokens_per_s)
        if run.ddp:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except KeyboardInterrupt:
        print(f"\nInterrupted. Continue later with the same command plus --resume (checkpoint: {args.out}/ckpt.pt).",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    run_main(main)
