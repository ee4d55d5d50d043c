"""Benchmark: gpt2/modeling_gpt2.py against transformers' GPT2LMHeadModel at GPT-2 124M's shape.

    python bench/bench_gpt2.py                 # fp32 and bf16 autocast, 5 repeats
    python bench/bench_gpt2.py --repeats 3 --device cuda

Same process, same random weights, same inputs. The two implementations alternate run by run, so that
whatever else the machine does hits both alike; each figure is the median of the repeats. Measured:
  forward   8 x 128 tokens, no grad                              (seconds, lower is better)
  train     one AdamW step on 4 x 128 tokens (forward+backward)  (seconds)
  generate  64 new tokens, greedy, with the KV cache, batch 1    (tokens/s, higher is better)
Ratios > 1 mean this repository's GPT-2 is faster.
"""

import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import torch
from transformers import GPT2Config
from transformers import GPT2LMHeadModel as Reference
from transformers.utils import logging as hf_logging

from course_utils import ArgumentParser, parse_args, pick_device, run_main
from gpt2.modeling_gpt2 import GPT2LMHeadModel as Ours


def make_models(device):
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    torch.manual_seed(0)
    reference = Reference(config).to(device)
    ours = Ours(config).to(device)
    ours.load_state_dict(reference.state_dict())
    return {"transformers": reference, "ours": ours}


def autocast(device, bf16):
    kind = torch.device(device).type  # "cuda" for cuda:1 too
    return torch.autocast(device_type=kind, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_forward(model, device, bf16):
    ids = torch.randint(0, 50257, (8, 128), device=device)
    model.eval()
    with torch.no_grad(), autocast(device, bf16):
        sync(device)
        start = time.perf_counter()
        model(ids)
        sync(device)
    return time.perf_counter() - start


def time_train_step(model, device, bf16, optimizers):
    ids = torch.randint(0, 50257, (4, 128), device=device)
    model.train()
    optimizer = optimizers.setdefault(id(model), torch.optim.AdamW(model.parameters(), lr=1e-5))
    sync(device)
    start = time.perf_counter()
    with autocast(device, bf16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def time_generate(model, device, bf16, new_tokens=64):
    ids = torch.randint(0, 50257, (1, 16), device=device)
    model.eval()
    with torch.no_grad(), autocast(device, bf16):
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync(device)
    assert out.shape[1] == 16 + new_tokens
    return new_tokens / (time.perf_counter() - start)


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto (a GPU when PyTorch sees one), cpu, cuda or cuda:N")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv)
    device = pick_device(args.device)
    hf_logging.set_verbosity_error()
    models = make_models(device)
    print(f"GPT-2 124M on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"median of {args.repeats}")
    print(f"{'benchmark':<28}{'transformers':>14}{'ours':>14}{'ours faster by':>16}")
    for bf16 in ([False] if args.no_bf16 else [False, True]):
        precision = "bf16" if bf16 else "fp32"
        optimizers = {}
        for name, function, unit in (
            ("forward 8x128", lambda m: time_forward(m, device, bf16), "s"),
            ("train step 4x128", lambda m: time_train_step(m, device, bf16, optimizers), "s"),
            ("generate 64 tokens", lambda m: time_generate(m, device, bf16), "tok/s"),
        ):
            ref, ours = medians(models, function, args.repeats)
            ratio = ref / ours if unit == "s" else ours / ref
            row = f"{precision + ' ' + name:<28}{ref:>11.3f} {unit:<3}{ours:>10.3f} {unit:<3}{ratio:>14.2f}x"
            print(row, flush=True)


def medians(models, function, repeats):
    """(transformers' median, ours) of `function` over `repeats` runs, after one warm-up run each."""
    for model in models.values():  # warm-up: first calls allocate and pick kernels
        function(model)
    samples = {key: [] for key in models}
    for repeat in range(repeats):
        # Alternate, and swap who goes first, so that machine noise and warm caches hit both alike.
        order = list(models.items()) if repeat % 2 == 0 else list(models.items())[::-1]
        for key, model in order:
            samples[key].append(function(model))
    return statistics.median(samples["transformers"]), statistics.median(samples["ours"])


if __name__ == "__main__":
    run_main(main)
