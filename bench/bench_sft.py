"""Benchmark for Task 8: SFT training throughput and peak memory of Supervised_Fine-Tuning.py against the
handout's original recipe, on real ShareGPT conversations.

Both train the same LoRA (r=16, alpha 32, dropout 0.05 on c_attn/c_proj/c_fc) on the same GPT-2 of the 124M
shape (random weights, loaded from one saved directory), on the same conversations, batch 4, with transformers'
Trainer, one batch per optimizer step:

  original : the handout's recipe: every conversation rendered as text, truncated and padded to 512 tokens,
             DataCollatorForLanguageModeling (labels = inputs), random batches, the model as loaded (fp32,
             GPT-2's dropouts), bf16 = Trainer's autocast
  this     : Supervised_Fine-Tuning.py's own main() with --max-steps: assistant-only labels, windows of up
             to 1024 tokens, length-grouped batches, its loss on labelled positions only, bf16 = a bf16 base,
             and on a CPU glibc's malloc told to keep freed memory (--original-keeps-freed-memory gives the
             original recipe that setting too, to see what it alone is worth)

Each run is a subprocess of its own (so its peak resident memory, VmHWM, is its own), run one after the
other, alternating recipes. Throughput = real (non-pad) tokens per second of training steps, after one
warm-up step. "CPU default" is the script with no --dtype (bf16 where the CPU has it).

Data: ../shared/data/sharegpt_dev_2000.json (real ShareGPT, OpenChat layout) or --data. Tokenizer:
model/gpt2-base's when present, else GPT-2's real BPE in ../shared/gpt2-tokenizer.

Run:  flock /work/flags/bench.lock python bench/bench_sft.py [--conversations 200 --steps 3 --rounds 1]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from course_utils import (  # noqa: E402
    ArgumentParser,
    UserError,
    gpt2_model_class,
    keep_freed_memory,
    load_script,
    parse_args,
    peak_rss_gb,
    run_main,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
DEFAULT_DATA = os.path.join(SHARED, "data", "sharegpt_dev_2000.json")


def load_sft():
    return load_script(os.path.join(ROOT, "Supervised_Fine-Tuning.py"))


def tokenizer_dir():
    local = os.path.join(ROOT, "model", "gpt2-base")
    if any(os.path.isfile(os.path.join(local, f)) for f in ("tokenizer.json", "vocab.json")):
        return local, "GPT-2's tokenizer (model/gpt2-base)"
    shared = os.path.join(SHARED, "gpt2-tokenizer")
    if os.path.isfile(os.path.join(shared, "vocab.json")):
        return shared, "GPT-2's real BPE (../shared/gpt2-tokenizer)"
    raise UserError("no GPT-2 tokenizer: put GPT-2's files in model/gpt2-base (or ../shared/gpt2-tokenizer).")


class StepTimer:
    """Wall time of each optimizer step and the real tokens its batches held."""

    def __init__(self, model, count):
        self.times, self.tokens, self._seen, self._t0 = [], [], 0, 0.0
        self.count = count
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if module.training:
            self._seen += self.count(kwargs)

    def on_step_begin(self, *a, **k):
        self._seen, self._t0 = 0, time.perf_counter()

    def on_step_end(self, *a, **k):
        self.times.append(time.perf_counter() - self._t0)
        self.tokens.append(self._seen)

    def result(self):
        tokens, seconds = sum(self.tokens[1:]), sum(self.times[1:])  # step 1 is warm-up
        return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "steps": len(self.times) - 1}


def worker_original(opts):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
    sft = load_sft()
    if opts.original_keeps_freed_memory:  # to see how much of the gap is the allocator setting alone
        keep_freed_memory()
    tok = AutoTokenizer.from_pretrained(opts.work)
    convs, _ = sft.load_conversations(os.path.join(opts.work, "conversations.json"))
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    enc = tok(texts, truncation=True, max_length=512, padding="max_length")
    dataset = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    model = gpt2_model_class(opts.model_impl).from_pretrained(opts.work, dtype=torch.float32)
    model.config.use_cache = False
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=sft.LORA_TARGETS, fan_in_fan_out=True, bias="none"))
    timer = StepTimer(model, lambda kw: int(kw["attention_mask"].sum()))
    callback = type("Timer", (TrainerCallback,), {"on_step_begin": lambda s, *a, **k: timer.on_step_begin(),
                                                   "on_step_end": lambda s, *a, **k: timer.on_step_end()})()
    args = TrainingArguments(output_dir=os.path.join(opts.work, "original-out"), max_steps=opts.steps + 1,
                             per_device_train_batch_size=opts.batch_size, learning_rate=2e-4,
                             bf16=opts.dtype == "bf16", use_cpu=True, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback],
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
    return timer.result()


def worker_this(opts):
    sft = load_sft()
    from transformers import TrainerCallback
    holder, counts = {}, []
    collate = sft.PadToLongest.__call__

    def counting_collate(self, features):  # the real tokens of each batch, in the order the model sees them
        counts.append(sum(len(f["input_ids"]) for f in features))
        return collate(self, features)
    sft.PadToLongest.__call__ = counting_collate

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            holder["timer"] = StepTimer(model, lambda kwargs: counts.pop(0))

        def on_step_begin(self, *a, **k):
            holder["timer"].on_step_begin()

        def on_step_end(self, *a, **k):
            holder["timer"].on_step_end()

    build_trainer = sft.build_trainer

    def build_timed_trainer(*args, **kwargs):  # the script's own Trainer, with the timer added from outside
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(Timer())
        return trainer
    sft.build_trainer = build_timed_trainer

    out = os.path.join(opts.work, f"this-{opts.dtype}")
    argv = ["--model", opts.work, "--data", os.path.join(opts.work, "conversations.json"), "--out", out,
            "--max-steps", str(opts.steps + 1), "--batch-size", str(opts.batch_size), "--grad-accum", "1",
            "--eval-size", "0", "--save-steps", "100000", "--logging-steps", "100000", "--overwrite",
            "--model-impl", opts.model_impl]
    if opts.dtype != "default":
        argv += ["--dtype", opts.dtype]
    sft.main(argv)
    return holder["timer"].result()


def prepare(args):
    """Pick the conversations, save them, the tokenizer and one random 124M GPT-2 for every run to load."""
    import torch
    from transformers import AutoTokenizer, GPT2Config
    sft = load_sft()
    tok_path, tok_note = tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(tok_path)
    tok.pad_token = tok.eos_token
    tok.chat_template = sft.ChatFormat().jinja()
    if not os.path.isfile(args.data):
        raise UserError(f"{args.data} not found: pass --data with ShareGPT conversations (JSON list or JSONL).")
    records, _ = sft.read_records(args.data)
    usable = [r for r in records if sft.normalize_record(r)[1] is None]
    random.Random(args.seed).shuffle(usable)
    records = usable[:args.conversations]  # the raw records: the script reads them as a user's file
    with open(os.path.join(args.work, "conversations.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)
    convs = [sft.normalize_record(r)[0] for r in records]
    skipped = len(sft.read_records(args.data)[0]) - len(usable)
    tok.save_pretrained(args.work)
    torch.manual_seed(0)
    config = GPT2Config(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # 124M shape, 50257 vocab
    gpt2_model_class(args.model_impl)(config).save_pretrained(args.work)

    lengths = [len(ids) for ids in tok([tok.apply_chat_template(c, tokenize=False) for c in convs])["input_ids"]]
    examples, _ = sft.build_examples(convs, tok, sft.ChatFormat(), 1024)
    windows = [e["length"] for e in examples]
    learned = sum(sum(l != -100 for l in e["labels"]) for e in examples)
    print(f"Data: {len(convs)} conversations drawn from {os.path.relpath(args.data, ROOT)} (its {skipped} unusable "
          f"records left out); tokenizer: {tok_note}.")
    print(f"  conversations: mean {sum(lengths) / len(lengths):.0f} tokens, "
          f"median {sorted(lengths)[len(lengths) // 2]}, "
          f"{100 * sum(n > 512 for n in lengths) / len(lengths):.0f}% over 512, "
          f"{100 * sum(n > 1024 for n in lengths) / len(lengths):.0f}% over 1024")
    print(f"  original: {len(convs)} examples of 512 tokens, "
          f"{100 * sum(min(n, 512) for n in lengths) / (512 * len(lengths)):.0f}% of them real (the rest padding)")
    print(f"  this script: {len(examples)} windows, mean {sum(windows) / len(windows):.0f} tokens, "
          f"{100 * learned / sum(windows):.0f}% of tokens learned (assistant replies + EOS)")
    impl = "transformers" if args.model_impl == "transformers" else "gpt2/modeling_gpt2.py"
    print(f"Model: {impl} GPT-2, 124M shape, random weights; "
          f"LoRA r=16; batch {args.batch_size}; {args.steps} measured steps after 1 warm-up; "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}", flush=True)


def run_worker(args, recipe, precision):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", recipe, "--dtype", precision,
           "--work", args.work, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--model-impl", args.model_impl] + ["--original-keeps-freed-memory"] * args.original_keeps_freed_memory
    run = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        print(run.stderr[-3000:], file=sys.stderr)
        raise UserError(f"the {recipe} {precision} run failed (exit status {run.returncode}; its last output is "
                        f"above): fix what it says and run the benchmark again.")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--conversations", type=int, default=200, help="conversations drawn from --data")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="measured steps per run (after 1 warm-up)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole alternation (results are averaged)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--no-default", action="store_true", help="skip the run of the script at its CPU default")
    p.add_argument("--model-impl", choices=["repo", "transformers"], default="repo",
                   help="which GPT-2 code: repo = gpt2/modeling_gpt2.py (Task 4), transformers = GPT2LMHeadModel")
    p.add_argument("--original-keeps-freed-memory", action="store_true",
                   help="give the original recipe the script's malloc setting too (keep_freed_memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["original", "this"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)  # one worker's: fp32, bf16 or default
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_alias("--reference", dest="model_impl", const="transformers")
    args = parse_args(p, argv)

    if args.worker:  # one measured run, in a process of its own
        import torch
        torch.manual_seed(0)
        result = (worker_original if args.worker == "original" else worker_this)(args)
        result["peak_gb"] = peak_rss_gb()
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_sft.") as work:
        args.work = work
        prepare(args)
        plan = [(recipe, precision) for precision in args.precisions for recipe in ("original", "this")]
        if not args.no_default:
            plan.append(("this", "default"))
        results = {}
        for round_ in range(args.rounds):
            for recipe, precision in (plan if round_ % 2 == 0 else plan[::-1]):
                r = run_worker(args, recipe, precision)
                results.setdefault((recipe, precision), []).append(r)
                print(f"  {recipe:8s} {precision:7s}: {r['tok_s']:7.1f} real tokens/s ({r['tokens']} tokens in "
                      f"{r['seconds']:.1f} s, {r['steps']} steps), peak memory {r['peak_gb']:.2f} GB", flush=True)
    tps = {k: sum(r["tok_s"] for r in v) / len(v) for k, v in results.items()}
    peak = {k: max(r["peak_gb"] for r in v) for k, v in results.items()}
    print(f"Ratios (this script / original recipe; load average now {os.getloadavg()[0]:.1f}):")
    for precision in args.precisions:
        print(f"  {precision}: {tps[('this', precision)] / tps[('original', precision)]:.2f}x speed; peak memory "
              f"{peak[('this', precision)]:.2f} GB vs {peak[('original', precision)]:.2f} GB")
    if ("this", "default") in tps and ("original", "fp32") in tps:
        print(f"  this script at its CPU default / original fp32: "
              f"{tps[('this', 'default')] / tps[('original', 'fp32')]:.2f}x; "
              f"peak memory {peak[('this', 'default')]:.2f} GB")
    return 0


if __name__ == "__main__":
    run_main(main)
