"""Benchmark for Task 8: SFT training throughput of Supervised_Fine-Tuning.py against the handout's original recipe.

Both train the same LoRA (r=16 on c_attn/c_proj/c_fc) on a GPT-2 of the 124M shape (random weights) with
transformers' Trainer, on the same conversations, same batch size:

  original : every conversation rendered as text, truncated and padded to 512 tokens,
             DataCollatorForLanguageModeling (labels = inputs, pad = EOS masked), random batches
  this     : Supervised_Fine-Tuning.py's examples (assistant-only labels, windows <= 1024 tokens),
             length-grouped batches padded only to the longest in the batch

Throughput = real (non-pad, attention_mask == 1) tokens per wall-clock second of training steps, after one
warm-up step, in fp32 and with bf16 autocast. Prints the four numbers and the ratios.

Data: data/sharegpt_gpt4.json when present; otherwise conversations assembled from the team's sample
(data/samples/sharegpt_sample.json) with 1-12 exchanges each, so lengths spread from a few dozen to several
hundred tokens. Tokenizer: model/gpt2-base's when present; otherwise a byte-level BPE trained on the sample
(the model keeps GPT-2's 50257-row vocabulary, so the compute has GPT-2's shape).

Run:  python bench/bench_sft.py [--steps-original 2 --steps-this 4 --batch-size 4 --precisions fp32 bf16]
"""
import argparse
import copy
import importlib.util
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import (DataCollatorForLanguageModeling, GPT2Config, GPT2TokenizerFast, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

spec = importlib.util.spec_from_file_location("sft", os.path.join(ROOT, "Supervised_Fine-Tuning.py"))
sft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sft)

SAMPLE = os.path.join(ROOT, "data", "samples", "sharegpt_sample.json")


def get_tokenizer():
    path = os.path.join(ROOT, "model", "gpt2-base")
    if os.path.isfile(os.path.join(path, "tokenizer.json")) or os.path.isfile(os.path.join(path, "vocab.json")):
        return GPT2TokenizerFast.from_pretrained(path), "GPT-2's tokenizer (model/gpt2-base)"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = [json.dumps(r, ensure_ascii=False) for r in json.load(open(SAMPLE, encoding="utf-8"))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts * 3, trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    return tok, f"a byte-level BPE of {len(tok)} tokens trained on the sample (GPT-2's files are not on disk)"


def get_conversations(n, seed):
    real = os.path.join(ROOT, sft.DEFAULT_DATA)
    if os.path.isfile(real):
        convs, _ = sft.load_conversations(real)
        random.Random(seed).shuffle(convs)
        return convs[:n], f"{n} conversations of {sft.DEFAULT_DATA}"
    convs, _ = sft.load_conversations(SAMPLE)
    exchanges = []
    for c in convs:
        for i in range(len(c) - 1):
            if c[i]["role"] == "user" and c[i + 1]["role"] == "assistant":
                exchanges.append(c[i:i + 2])
    rng = random.Random(seed)
    out = [[m for _ in range(rng.randint(1, 12)) for m in rng.choice(exchanges)] for _ in range(n)]
    return out, f"{n} conversations of 1-12 exchanges drawn from the sample"


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step and the real tokens it consumed (read off the model's inputs)."""

    def __init__(self, model):
        self.times, self.tokens, self._seen, self._t0 = [], [], 0, 0.0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if module.training and kwargs.get("attention_mask") is not None:
            self._seen += int(kwargs["attention_mask"].sum())

    def on_step_begin(self, args, state, control, **kwargs):
        self._seen, self._t0 = 0, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)
        self.tokens.append(self._seen)


def lora(model):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05, target_modules=sft.LORA_TARGETS,
                     fan_in_fan_out=True, bias="none")
    return get_peft_model(model, cfg)


def run(base, dataset, collator, steps, batch_size, precision, grouped, out_dir):
    model = lora(copy.deepcopy(base))
    timer = StepTimer(model)
    args = TrainingArguments(output_dir=out_dir, max_steps=steps + 1, per_device_train_batch_size=batch_size,
                             learning_rate=2e-4, bf16=precision == "bf16", use_cpu=True, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                             remove_unused_columns=False, label_names=["labels"],
                             train_sampling_strategy="group_by_length" if grouped else "random")
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[timer]).train()
    tokens, seconds = sum(timer.tokens[1:]), sum(timer.times[1:])  # step 1 is warm-up
    return tokens / seconds, tokens, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps-original", type=int, default=2, help="measured steps (after 1 warm-up)")
    p.add_argument("--steps-this", type=int, default=4, help="measured steps (after 1 warm-up)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--reference", action="store_true", help="transformers' GPT-2 instead of gpt2/modeling_gpt2.py")
    p.add_argument("--seed", type=int, default=0)
    args, _ = p.parse_known_args(argv)

    from datasets import Dataset
    tok, tok_note = get_tokenizer()
    tok.pad_token = tok.eos_token
    tok.chat_template = sft.ChatFormat().jinja()
    convs, data_note = get_conversations(args.conversations, args.seed)

    # Original recipe: rendered text, truncation + padding to 512, labels = input_ids (pad/EOS masked).
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    enc = tok(texts, truncation=True, max_length=512, padding="max_length", split_special_tokens=False)
    original = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    original_collator = DataCollatorForLanguageModeling(tok, mlm=False)
    # This script: assistant-only labels, windows, length-grouped dynamic padding.
    examples, _ = sft.build_examples(convs, tok, sft.ChatFormat(), 1024)
    this = Dataset.from_list(examples)
    this_collator = sft.PadToLongest(tok.pad_token_id)

    lengths = [e["length"] for e in examples]
    real_512 = sum(enc["attention_mask"][i].count(1) for i in range(len(convs)))
    print(f"Data: {data_note}; tokenizer: {tok_note}.")
    print(f"  this script: {len(examples)} examples, mean {sum(lengths) / len(lengths):.0f} tokens, max {max(lengths)}")
    print(f"  original: {len(convs)} examples of 512, {100 * real_512 / (512 * len(convs)):.0f}% real tokens "
          f"(the rest padding), {sum(len(ids) > 512 for ids in tok(texts)['input_ids'])} truncated")
    torch.manual_seed(0)
    cls = sft.model_class(args.reference)
    config = GPT2Config(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # 124M shape, 50257 vocab
    base = cls(config)
    base.config.use_cache = False
    print(f"Model: {'transformers' if args.reference else 'gpt2/modeling_gpt2.py'} GPT-2 124M shape, random weights; "
          f"batch {args.batch_size}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")

    results = {}
    out_dir = os.path.join("/tmp", "bench_sft_trainer")
    for precision in args.precisions:
        for name, ds, coll, steps, grouped in [("original", original, original_collator, args.steps_original, False),
                                               ("this", this, this_collator, args.steps_this, True)]:
            tps, tokens, secs = run(base, ds, coll, steps, args.batch_size, precision, grouped, out_dir)
            results[(name, precision)] = tps
            print(f"  {name:8s} {precision}: {tps:8.1f} real tokens/s  ({tokens} tokens in {secs:.1f} s, {steps} steps)",
                  flush=True)
    print(f"Ratios (this script / original recipe; load average now {os.getloadavg()[0]:.1f}):")
    for precision in args.precisions:
        print(f"  {precision}: {results[('this', precision)] / results[('original', precision)]:.2f}x")
    if "fp32" in args.precisions and "bf16" in args.precisions:
        print(f"  this bf16 / original fp32 (as each runs by default on this CPU): "
              f"{results[('this', 'bf16')] / results[('original', 'fp32')]:.2f}x")
    return results


if __name__ == "__main__":
    main()
