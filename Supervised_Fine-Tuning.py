"""Task 8: supervised fine-tuning (SFT) of GPT-2 on ShareGPT conversations, with LoRA and 4-bit quantization.

任务 8：用 ShareGPT 格式的 GPT-4 对话（OpenChat 的 sharegpt_gpt4.json，约 6.2k 条）对 GPT-2 做有监督微调。
"Mean(GPT2, GPT4) = GPT3?" —— 用 LoRA 只训练很少的参数，用 4-bit 量化节省显存，然后用 ChatGPT2-base.py 聊天。

What happens, top to bottom:
  1. read the conversations (JSON list or JSONL), normalise every record to user / assistant / system turns,
     skip the unusable ones and count them by reason;
  2. render each conversation in ONE chat format (stored as the tokenizer's Jinja `chat_template`, saved next
     to the adapter), tokenize it turn by turn and build `labels` by position: only the assistant replies and
     their end-of-reply token `<|endoftext|>` are trained, everything else is -100;
  3. split conversations longer than --max-length at turn boundaries into windows;
  4. load GPT-2 (this repository's gpt2/modeling_gpt2.py; --model-impl transformers for transformers' own),
     4-bit on a GPU, add LoRA adapters, and train with transformers' Trainer (length-grouped batches,
     checkpoints, --resume, eval loss / perplexity before and after, a loss-curve PNG). The loss is computed
     only where a label is (the LM head on assistant tokens only), and without an attention mask (padding is
     only at the end);
  5. write the adapter + tokenizer atomically to --out (and a merged model with --merge).

Run:
  python Supervised_Fine-Tuning.py                               # defaults: model/gpt2-base, data/sharegpt_gpt4.json
  python Supervised_Fine-Tuning.py --max-steps 200 --save-steps 50
  python Supervised_Fine-Tuning.py --resume                      # continue after Colab / Ctrl-C / kill
  python Supervised_Fine-Tuning.py --dump-dataset train.jsonl    # only show what would be trained, then exit
  accelerate launch Supervised_Fine-Tuning.py ...                # several GPUs (or torchrun --nproc_per_node N)
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass

from course_utils import (
    DTYPE_CHOICES,
    ArgumentParser,
    UserError,
    atomic_path,
    cpu_supports_bf16,
    gpt2_model_class,
    keep_freed_memory,
    local_or_hub,
    parse_args,
    pick_device,
    pick_dtype,
    plot_losses,
    run_main,
    script_dir,
    use_fused_gelu,
)

HERE = script_dir(globals())
DEFAULT_MODEL = "model/gpt2-base"
HUB_MODEL = "gpt2"
DEFAULT_DATA = "data/sharegpt_gpt4.json"
HUB_DATASET = "openchat/openchat_sharegpt4_dataset"
HUB_DATA_FILE = "sharegpt_gpt4.json"
DEFAULT_OUT = "model/chatgpt2-base"
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # attention qkv + output projection, MLP in + out
IGNORE = -100  # label value that CrossEntropyLoss (and every 🤗 model) ignores

# ShareGPT dumps name their speakers in many ways; everything maps onto three roles.
ROLE_MAP = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "gpt4": "assistant", "gpt-4": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
}
TURN_KEYS = ("items", "conversations", "messages")  # OpenChat, classic ShareGPT, OpenAI-style


def log(*args):
    """Print on the main process only: under torchrun / accelerate every GPU runs this script."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def build_parser():
    p = ArgumentParser(description="LoRA (+4-bit) supervised fine-tuning of GPT-2 on ShareGPT conversations.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"base model directory or hub id (default {DEFAULT_MODEL}, hub `{HUB_MODEL}`)")
    p.add_argument("--data", default=DEFAULT_DATA, help="ShareGPT conversations: a JSON list or JSONL file")
    p.add_argument("--out", default=DEFAULT_OUT, help="where the LoRA adapter + tokenizer (with chat template) go")
    p.add_argument("--model-impl", choices=["repo", "transformers"], default="repo",
                   help="which GPT-2 code: repo = gpt2/modeling_gpt2.py (Task 4), transformers = GPT2LMHeadModel")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = a CUDA GPU when PyTorch sees one; cpu trains on the CPU even then")
    # length of training
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4, help="conversations (windows) per device per step")
    p.add_argument("--grad-accum", type=int, default=4, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-length", type=int, default=1024,
                   help="tokens per training window (GPT-2's context is 1024)")
    p.add_argument("--seed", type=int, default=42)
    # chat format
    p.add_argument("--user-name", default="Human", help="speaker name of user turns in the chat format")
    p.add_argument("--bot-name", default="chatgpt2-base", help="speaker name of assistant turns")
    p.add_argument("--system-name", default="System", help="speaker name of system turns")
    # memory savers
    p.add_argument("--quant", choices=["auto", "4bit", "8bit", "none"], default="auto",
                   help="auto = 4bit (NF4) on a CUDA GPU, none on CPU")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="training precision; auto = bf16 where the GPU/CPU supports it, else fp16 on GPU / fp32 on CPU")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward to save memory (default: on for GPU, off for CPU)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--attn-dropout", type=float, default=0.0,
                   help="dropout on the frozen base's attention weights (GPT-2's own is 0.1). Default 0: on a CPU any "
                        "attention dropout forces PyTorch's slow unfused attention (about 8x slower at 1024 tokens)")
    # bookkeeping
    p.add_argument("--eval-size", type=int, default=100,
                   help="conversations held out for eval loss (at most 1/5 of the data; 0 = none)")
    p.add_argument("--eval-steps", type=int, default=0,
                   help="also evaluate every N steps (0 = only before and after training)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=200, help="write a checkpoint every N steps")
    p.add_argument("--save-total-limit", type=int, default=3)
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>-checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--overwrite", action="store_true", help="delete checkpoints of an earlier run and start over")
    p.add_argument("--dump-dataset", metavar="OUT.jsonl", default=None,
                   help="write the tokenized training examples (input_ids, labels) to OUT.jsonl and exit")
    p.add_argument("--merge", action="store_true",
                   help="also export base+adapter merged into one model (<out>-merged)")
    p.add_argument("--merge-only", action="store_true", help="only merge the adapter already in --out, no training")
    p.add_argument("--merge-output", default=None, help="default: <out>-merged")
    # The names of earlier versions still work (not shown in --help).
    p.add_alias("--output", dest="out")
    p.add_alias("--precision", dest="dtype")
    p.add_alias("--reference", dest="model_impl", const="transformers")
    return p


def check_options(args):
    """Fail fast on a bad combination, before anything is loaded; fill in the paths that default to --out's."""
    if args.max_length < 32:
        raise UserError(f"--max-length {args.max_length} is too short: use at least 32 tokens.")
    args.device = pick_device(args.device)
    args.dtype = training_dtype(args.dtype, args.device)
    args.out = args.out.rstrip("/\\")
    args.checkpoint_dir = args.checkpoint_dir or args.out + "-checkpoints"
    args.merge_output = args.merge_output or args.out + "-merged"


def training_dtype(name, device):
    """--dtype as course_utils picks it, except that an explicit bf16 on a device without bf16 units falls back
    (saying so): to fp16 on an older GPU, to fp32 on a CPU (emulated bf16 is slower than fp32 there)."""
    import torch
    dtype = pick_dtype(name, device)
    cuda = device.startswith("cuda")
    if dtype == "bf16" and not (torch.cuda.is_bf16_supported() if cuda else cpu_supports_bf16()):
        log("this device has no bf16 support: training in " + ("fp16." if cuda else "fp32."))
        return "fp16" if cuda else "fp32"
    return dtype


# ---------------------------------------------------------------------------------------------------------
# 1. Finding weights and data: local directory first, then the hub (and say so), fail fast when offline.
# ---------------------------------------------------------------------------------------------------------

def resolve_model(path):
    """Return a local directory with the model, downloading from the hub only when it is not on disk."""
    return local_or_hub(path, HUB_MODEL if path == DEFAULT_MODEL else path, HERE, announce=log)


def resolve_data(path):
    """The conversations file: only the default one is fetched from the hub (a missing file of your own is a typo)."""
    if path != DEFAULT_DATA and not any(os.path.isfile(p) for p in (path, os.path.join(HERE, path))):
        raise UserError(f"data file {path} not found: pass --data with ShareGPT conversations (a JSON list or JSONL).")
    return local_or_hub(path, HUB_DATASET, HERE, filename=HUB_DATA_FILE, repo_type="dataset", announce=log)


# ---------------------------------------------------------------------------------------------------------
# 2. Reading ShareGPT records. A bad record is skipped and counted, never a crash.
# ---------------------------------------------------------------------------------------------------------

def read_records(path):
    """A JSON list of records, or JSONL (one record per line; a line that is not JSON counts as bad)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: save the conversations as UTF-8 JSON or JSONL.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        return data, Counter()
    if isinstance(data, dict) and not any(k in data for k in TURN_KEYS):
        raise UserError(f"{path} holds one JSON object, not a list of conversations: save them as a JSON list "
                        f"or JSONL.")
    if isinstance(data, dict):  # a JSONL file with a single line
        return [data], Counter()
    records, bad = [], Counter()
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad["not JSON"] += 1
    if not records and bad:
        raise UserError(f"{path} is neither a JSON list nor JSONL: save the conversations in one of these.")
    return records, bad


def normalize_record(record):
    """One ShareGPT record -> ([{"role", "content"}, ...], None), or (None, reason it cannot be used)."""
    if not isinstance(record, dict):
        return None, "not an object"
    turns = next((record[k] for k in TURN_KEYS if k in record), None)
    if not isinstance(turns, list) or not turns:
        return None, "no turns"
    messages = []
    system = record.get("system")  # some dumps keep the system prompt next to the turns
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system.strip()})
    for turn in turns:
        if not isinstance(turn, dict):
            return None, "bad turn"
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            return None, "non-string text"
        if not text.strip():
            return None, "empty text"
        role = ROLE_MAP.get(str(speaker).strip().lower())
        if role is None:
            return None, "unknown role"
        # Leading/trailing white space carries no meaning and would make tokenization depend on the neighbours.
        messages.append({"role": role, "content": text.strip()})
    # The model learns to answer a user, so an assistant turn before any user turn has nothing to answer,
    # and a final user turn has no answer to learn from.
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) > first and messages[first]["role"] == "assistant":
        del messages[first]
    while messages and messages[-1]["role"] == "user":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no assistant reply"
    return messages, None


def load_conversations(path):
    """Read a file and return (usable conversations, Counter of skip reasons)."""
    records, skipped = read_records(path)
    conversations = []
    for record in records:
        messages, reason = normalize_record(record)
        if reason:
            skipped[reason] += 1
        else:
            conversations.append(messages)
    return conversations, skipped


# ---------------------------------------------------------------------------------------------------------
# 3. One chat format: a Jinja template (what 🤗 tools use) and the same format built token by token here.
#
#    System: {system}\n  Human: {question}\n  chatgpt2-base: {reply}<|endoftext|>  Human: ...
#
#    Each piece ("Human:", " {text}", "\n", "chatgpt2-base:", " {reply}", EOS) ends where GPT-2's byte-level
#    pre-tokenizer splits anyway, so tokenizing the pieces one by one gives exactly the tokens of tokenizing
#    the rendered string — the tests check this against apply_chat_template.
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ChatFormat:
    user_name: str = "Human"
    bot_name: str = "chatgpt2-base"
    system_name: str = "System"

    def __post_init__(self):
        for name in (self.user_name, self.bot_name, self.system_name):
            # The names are pasted into the Jinja source and must not change where tokens split.
            if not name or name != name.strip() or re.search(r"[\"'\\{}%#\n]", name):
                raise UserError(f"speaker name {name!r} must be non-empty text without quotes, braces, %, # or "
                                f"outer spaces.")

    def prefix(self, role):
        return {"system": self.system_name, "user": self.user_name, "assistant": self.bot_name}[role] + ":"

    def jinja(self):
        """The chat template saved with the tokenizer (tokenizer.chat_template)."""
        return (
            "{%- for message in messages -%}\n"
            "{%- if message['role'] == 'system' -%}\n"
            f"{self.system_name}: {{{{ message['content'] | trim }}}}{{{{ '\\n' }}}}\n"
            "{%- elif message['role'] == 'user' -%}\n"
            f"{self.user_name}: {{{{ message['content'] | trim }}}}{{{{ '\\n' }}}}\n"
            "{%- elif message['role'] == 'assistant' -%}\n"
            f"{self.bot_name}: {{{{ message['content'] | trim }}}}{{{{ eos_token }}}}\n"
            "{%- else -%}\n"
            "{{ raise_exception('unknown role: ' + message['role']) }}\n"
            "{%- endif -%}\n"
            "{%- endfor -%}\n"
            "{%- if add_generation_prompt -%}\n"
            f"{self.bot_name}:\n"
            "{%- endif -%}\n"
        )


@dataclass
class Block:
    """One turn as tokens: prefix ("Human:") + content (" text") + suffix ("\\n", or EOS after a reply)."""
    prefix: list
    content: list
    suffix: list
    trainable: bool  # assistant turn: content + suffix are learned

    @property
    def ids(self):
        return self.prefix + self.content + self.suffix

    @property
    def labels(self):
        learned = self.content + self.suffix if self.trainable else [IGNORE] * (len(self.content) + len(self.suffix))
        return [IGNORE] * len(self.prefix) + learned

    def __len__(self):
        return len(self.prefix) + len(self.content) + len(self.suffix)


def encode_conversations(conversations, tokenizer, fmt):
    """Turn every conversation into a list of Blocks, tokenizing all message texts in one batch call."""
    def plain(texts):
        # split_special_tokens: a literal "<|endoftext|>" typed in a message is text, not the EOS token.
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    prefixes = dict(zip(["system", "user", "assistant"],
                        plain([fmt.prefix("system"), fmt.prefix("user"), fmt.prefix("assistant")])))
    newline = plain(["\n"])[0]
    texts = [" " + m["content"].strip() for conv in conversations for m in conv]
    contents = iter(plain(texts) if texts else [])
    encoded = []
    for conv in conversations:
        blocks = []
        for m in conv:
            bot = m["role"] == "assistant"
            blocks.append(Block(list(prefixes[m["role"]]), next(contents),
                                [tokenizer.eos_token_id] if bot else list(newline), bot))
        encoded.append(blocks)
    return encoded


def truncated_window(prompt, reply, max_length):
    """A reply too long for one window: keep (at most half a window of) its prompt, cut the reply.
    A cut reply gets no EOS: the model must not learn to stop in the middle of a sentence."""
    ids, labels = [], []
    if prompt is not None:
        room = max(0, max_length // 2 - len(prompt.prefix) - len(prompt.suffix))
        prompt = Block(prompt.prefix, prompt.content[:room], prompt.suffix, False)
        ids, labels = prompt.ids, prompt.labels
    room = max_length - len(ids) - len(reply.prefix)
    whole = len(reply.content) + len(reply.suffix) <= room
    kept = Block(reply.prefix, reply.content if whole else reply.content[:room], reply.suffix if whole else [], True)
    return ids + kept.ids, labels + kept.labels, not whole


def window_conversation(blocks, max_length):
    """Split a conversation at turn boundaries into windows of at most max_length tokens.

    Each window ends with an assistant reply, learns only replies that no earlier window learned, and is
    filled backwards with as much preceding conversation (as context, not learned) as fits.
    Returns a list of (input_ids, labels) and the number of replies that had to be cut."""
    lengths = [len(b) for b in blocks]
    span = lambda s, e: sum(lengths[s:e + 1])
    windows, covered, cut = [], -1, 0
    for a, block in enumerate(blocks):
        if not block.trainable or a <= covered:
            continue
        start = a - 1 if a > 0 else a  # the reply plus the turn it answers
        if span(start, a) > max_length:
            ids, labels, was_cut = truncated_window(blocks[start] if start < a else None, block, max_length)
            windows.append((ids, labels))
            cut += was_cut
            covered = a
            continue
        end, j = a, a + 1
        while j < len(blocks) and span(start, j) <= max_length:  # more replies forward, while they fit
            if blocks[j].trainable:
                end = j
            j += 1
        while start > 0 and span(start - 1, end) <= max_length:  # then earlier turns as context
            start -= 1
        ids, labels = [], []
        for k in range(start, end + 1):
            ids += blocks[k].ids
            labels += blocks[k].labels if k > covered else [IGNORE] * lengths[k]
        windows.append((ids, labels))
        covered = end
    return windows, cut


def build_examples(conversations, tokenizer, fmt, max_length):
    """Conversations -> training examples {"input_ids", "labels", "length"} and a few counts."""
    examples, stats = [], Counter()
    for blocks in encode_conversations(conversations, tokenizer, fmt):
        windows, cut = window_conversation(blocks, max_length)
        stats["conversations"] += 1
        stats["split"] += len(windows) > 1
        stats["cut replies"] += cut
        for ids, labels in windows:
            examples.append({"input_ids": ids, "labels": labels, "length": len(ids)})
    return examples, stats


def split_conversations(conversations, eval_size, seed):
    """Hold out whole conversations (not windows), so no eval text was trained on."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = min(eval_size, len(conversations) // 5)
    held = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [conversations[i] for i in sorted(held)]


class PadToLongest:
    """Collate a batch by padding at the END to its longest example (the sampler groups similar lengths, so
    little is padded). Padding is never learned (-100); real EOS labels stay.

    No attention mask: with padding only at the end, causal attention already keeps every real token from
    seeing it (a token sees only the tokens before it), so the losses are exactly those with a mask. Without
    a mask, PyTorch's attention runs its fused kernel (on a CPU it accepts no mask), and no mask is built."""

    def __init__(self, pad_id, multiple_of=None):
        self.pad_id, self.multiple_of = pad_id, multiple_of

    def __call__(self, features):
        import torch
        n = max(len(f["input_ids"]) for f in features)
        if self.multiple_of:  # tensor cores like multiples of 8
            n = -(-n // self.multiple_of) * self.multiple_of
        batch = {"input_ids": [], "labels": []}
        for f in features:
            pad = n - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------
# 3b. The loss, computed only where something is learned.
#
#    A model's own loss multiplies EVERY position's hidden state by the 50,257-row output matrix, although
#    only assistant tokens have labels: at batch 4 x 1024 that is 4x1024x50257 floats (823 MB in fp32) plus
#    their gradient. Here the model returns its last hidden states (its lm_head is swapped for a pass-through
#    while training), and the head + cross-entropy run only on the labelled positions, a slice at a time.
#    tests/test_sft.py checks the loss and the LoRA gradients against the model's own full-logits loss.
# ---------------------------------------------------------------------------------------------------------

LOSS_SLICE = 1024  # labelled positions per matrix product with the head: 1024 x 50257 logits at a time
SOFTMAX_ROWS = 32  # rows of logits per softmax pass: 32 x 50257 floats (6 MB) stay in the CPU's cache


def head_loss_sum(hidden, weight, targets):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), for a frozen weight, slice by slice.

    Each slice's gradient with respect to `hidden`, (softmax - one_hot) @ weight, is computed right away, so
    no vocabulary-sized tensor is kept for the backward pass. The returned number has the loss as its value
    and that gradient as its gradient (the usual `x - x.detach()` trick: zero in value, x's gradient).
    The softmax runs in fp32 (as the model's own loss does) a few rows at a time, while they are in the cache
    (measured on a CPU: 86 ms instead of 206 ms for 1024 rows), and writes softmax - one_hot over the logits.
    In fp32 on a CPU the logits are laid out the other way round (_head_loss_sum_transposed), which is faster."""
    import torch
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden)
    if hidden.dtype == torch.float32 and hidden.device.type == "cpu":
        return _head_loss_sum_transposed(hidden, weight.detach().float(), targets, total, grad)
    with torch.no_grad():
        w = weight.to(hidden.dtype)
        rows = SOFTMAX_ROWS if hidden.device.type == "cpu" else LOSS_SLICE  # a GPU wants few, large passes
        work = None if w.dtype == torch.float32 else torch.empty(rows, w.size(0), device=w.device)
        for s in range(0, hidden.size(0), LOSS_SLICE):
            logits = hidden[s:s + LOSS_SLICE] @ w.t()
            for r in range(0, logits.size(0), rows):
                x = logits[r:r + rows]
                t = targets[s + r:s + r + len(x)]
                top = x.amax(dim=-1, keepdim=True).float()
                picked = x.gather(1, t[:, None]).float()
                probs = torch.sub(x, top, out=x if work is None else work[:len(x)]).exp_()
                sums = probs.sum(dim=-1, keepdim=True)
                total += (top + sums.log() - picked).sum()  # logsumexp - the target's logit
                if hidden.requires_grad:  # d(loss)/d(logits) = softmax - one_hot, over the logits
                    torch.div(probs, sums, out=x)[torch.arange(len(t), device=t.device), t] -= 1
            if hidden.requires_grad:
                grad[s:s + LOSS_SLICE] = (logits @ w).to(grad.dtype)
    return _loss_with_gradient(hidden, total, grad)


def _head_loss_sum_transposed(hidden, w, targets, total, grad):
    """head_loss_sum for fp32 on a CPU, with the logits laid out as (vocabulary, rows).

    Same numbers, other memory layout: on the CPUs we measured, weight @ hidden.T runs at 674-706 ms per 1024
    rows against 950 ms for hidden @ weight.T (the vocabulary-sized operand is then the one read in order),
    and the gradient logits.T @ weight costs the same as before. In bf16 this layout is slower; it is not used."""
    import torch
    with torch.no_grad():
        for s in range(0, hidden.size(0), LOSS_SLICE):
            logits = w @ hidden[s:s + LOSS_SLICE].t()  # (vocabulary, rows)
            t = targets[s:s + LOSS_SLICE]
            columns = torch.arange(len(t), device=t.device)
            top = logits.amax(dim=0)
            picked = logits[t, columns]
            probs = logits.sub_(top).exp_()
            sums = probs.sum(dim=0)
            total += (top + sums.log() - picked).sum()  # logsumexp - the target's logit
            if hidden.requires_grad:  # d(loss)/d(logits) = softmax - one_hot
                probs.div_(sums)[t, columns] -= 1
                grad[s:s + LOSS_SLICE] = probs.t() @ w
    return _loss_with_gradient(hidden, total, grad)


def _loss_with_gradient(hidden, total, grad):
    """The loss as value, with `grad` as its gradient with respect to `hidden` (zero in value)."""
    if not hidden.requires_grad:  # evaluation: the loss is all that is needed
        return total
    surrogate = (hidden.float() * grad.float()).sum()
    return total + (surrogate - surrogate.detach())


def assistant_loss(head_weight):
    """Trainer's compute_loss_func: mean cross-entropy over the labelled (assistant + EOS) tokens."""
    import torch.nn.functional as F

    def loss_func(outputs, labels, num_items_in_batch=None):
        hidden = outputs["logits"]  # the last hidden states (lm_head is a pass-through while training)
        targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:].to(hidden.device)  # position t predicts token t+1
        learned = targets != IGNORE
        h, t = hidden[learned], targets[learned]
        if head_weight.requires_grad:  # a trained head (not the case with LoRA): the plain computation
            total = F.cross_entropy(F.linear(h, head_weight.to(h.dtype)).float(), t, reduction="sum")
        else:
            total = head_loss_sum(h, head_weight, t)
        # Under gradient accumulation Trainer passes the number of labelled tokens of the whole accumulated
        # batch, so the loss is one mean over all of them (like the model's own loss).
        count = num_items_in_batch if num_items_in_batch is not None else max(t.numel(), 1)
        return total / count
    return loss_func


# ---------------------------------------------------------------------------------------------------------
# 4. Model: GPT-2 (ours or transformers'), quantized on a GPU, with LoRA adapters.
# ---------------------------------------------------------------------------------------------------------

def pick_quant(choice, cuda):
    if choice == "none":
        return None
    if not cuda:
        if choice != "auto":
            log(f"no CUDA GPU: {choice} quantization is for GPUs here, training without quantization.")
        else:
            log("no CUDA GPU: training without quantization (4-bit is used on a GPU).")
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        log("bitsandbytes is not installed (pip install bitsandbytes): training without quantization.")
        return None
    return "4bit" if choice == "auto" else choice


# Peak resident memory of a CPU run at GPT-2 124M's shape, from bench/bench_sft.py (see the README; its first
# batch is the longest, 4 windows of 1024 tokens): 5.48 GB in fp32 and 3.04 GB in bf16 (2-core AMD EPYC, with
# the lean dropout and LoRA below and keep_freed_memory; 8.4 GB for the handout's recipe). So: a fixed part
# (libraries, weights, optimizer) plus activations per token of the batch. With gradient checkpointing only each
# block's input is kept (the figures for it are estimates, not measured).
MEMORY_FIXED_GB = 1.2
ACTIVATION_MB_PER_TOKEN = {("bf16", False): 0.50, ("fp32", False): 1.10, ("bf16", True): 0.25, ("fp32", True): 0.35}


def check_memory(batch_size, max_length, bf16, checkpointing):
    """Before a CPU run starts: say in one sentence when its batch cannot fit in the memory that is free."""
    import psutil
    per_token = ACTIVATION_MB_PER_TOKEN[("bf16" if bf16 else "fp32", bool(checkpointing))]
    need = MEMORY_FIXED_GB + batch_size * max_length * per_token / 1024
    free = psutil.virtual_memory().available / 2**30
    if need > free:
        hint = "" if checkpointing else " or pass --gradient-checkpointing"
        raise UserError(f"batch {batch_size} x {max_length} tokens needs about {need:.1f} GB of memory and "
                        f"{free:.1f} GB are free: use a smaller --batch-size (and a larger --grad-accum){hint}.")
    log(f"Memory: about {need:.1f} GB needed at batch {batch_size} x {max_length} tokens, {free:.1f} GB free.")


def load_base_model(path, model_impl, quant, compute_dtype, base_dtype, attn_dropout):
    """The frozen base: 4/8-bit on a GPU, else in `base_dtype` (bf16 when training in bf16: LoRA trains
    only its adapters, so the base needs no fp32 master copy that autocast would re-cast at every step)."""
    from transformers import BitsAndBytesConfig
    kwargs = {"attn_pdrop": attn_dropout}  # a config override
    if quant == "4bit":
        # NF4 weights + double quantization (quantize the scales too), matrix products in bf16/fp16.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quant:  # quantized weights live on one GPU per process (one process per GPU under torchrun)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    cls = gpt2_model_class(model_impl)
    try:
        model = cls.from_pretrained(path, dtype=None if quant else base_dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a GPT-2 from {path} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                        f"pass --model with a GPT-2 directory or hub id.") from None
    model.config.use_cache = False  # the KV cache is for generation; training does not need it
    use_fused_gelu(model)
    return model


# On a CPU, PyTorch's dropout draws its mask with bernoulli_ (11% of a 124M training step here, more than the
# attention) and keeps it as a 4-byte float for the backward pass. The functions below draw the same kind of mask
# from raw 64-bit random numbers (16 bits per element: the drop probability is p rounded to 1/65536 and the scale
# is exactly 1/(1 - that), so the expectation is unchanged) and keep it as 1 byte.
# PEFT's LoRA layer costs more than its few parameters suggest: its dropout keeps one more full copy of each
# adapted layer's input, and with a bf16 base it casts that input to the adapter's fp32 and the output back (a
# quarter of a bf16 step here). use_lean_lora computes the same thing in the input's dtype (only the small
# r-wide weights are cast), with the dropout folded into lora_A and lora_B's product added onto the base output
# in one addmm. tests/test_sft.py checks the values and gradients against PEFT's own forward.
# Only for CPU training: on a GPU PyTorch's own fused dropout already keeps a 1-byte mask, and autocast casts.

def keep_mask(like, p):
    """(boolean mask keeping each element with probability 1 - p', scale 1/(1 - p')), p' = p rounded to 1/65536."""
    import torch
    n = like.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-2**63, None)  # all 64 bits
    drop = round(p * 65536)
    keep = bits.view(torch.int16)[:n].view(like.shape) >= drop - 32768  # uniform int16: P(below) = drop / 65536
    return keep, 65536 / (65536 - drop)


def _dropout_functions():
    import torch

    class Dropout(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p):
            keep, scale = keep_mask(x, p)
            ctx.save_for_backward(keep)
            ctx.scale = scale
            return torch.where(keep, x * scale, 0.0)

        @staticmethod
        def backward(ctx, grad):
            keep, = ctx.saved_tensors
            return torch.where(keep, grad * ctx.scale, 0.0), None

    class DropoutLinear(torch.autograd.Function):
        """dropout(x) @ weight.T in x's dtype, keeping the unscaled dropped copy of x and the 1-byte mask.
        The weight (r x in, fp32) is cast to x's dtype; its gradient comes back in the weight's own dtype.
        Keeping the dropped copy costs no memory over keeping x itself: nothing else holds on to these inputs
        (the frozen base layer saves none; layer norm and GELU keep their inputs, not their outputs)."""
        @staticmethod
        def forward(ctx, x, weight, p):
            keep, scale = keep_mask(x, p)
            kept = torch.where(keep, x, 0.0)
            ctx.save_for_backward(kept, weight, keep)
            ctx.scale = scale
            # The scale goes onto the small weight, not onto the wide input: one pass over x less.
            return kept @ (weight * scale).to(x.dtype).t()

        @staticmethod
        def backward(ctx, grad):
            kept, weight, keep = ctx.saved_tensors
            grad_x = grad_w = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.where(keep, grad @ (weight * ctx.scale).to(grad.dtype), 0.0)
            if ctx.needs_input_grad[1]:
                grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ kept.reshape(-1, kept.shape[-1])).to(weight.dtype)
                grad_w *= ctx.scale
            return grad_x, grad_w, None

    return Dropout, DropoutLinear


def use_lean_dropout(model):
    """GPT-2's own dropouts (embeddings, residuals) with the 1-byte masks above; the identity in eval mode."""
    import functools

    import torch
    Dropout, _ = _dropout_functions()

    def dropout_forward(module, x):
        if module.training and 0 < module.p < 1:
            return Dropout.apply(x, module.p)
        return torch.nn.functional.dropout(x, module.p, module.training)

    for module in model.modules():
        if type(module) is torch.nn.Dropout:
            module.forward = functools.partial(dropout_forward, module)


def frozen_conv1d_output(layer, x):
    """GPT-2's Conv1D (x @ weight + bias) as a fresh (rows, out) matrix, or None for any other layer.
    (transformers' Conv1D and our subclass of it in gpt2/modeling_gpt2.py both compute exactly this.)

    Conv1D itself returns a view of that matrix; adding LoRA's term in place on a view would cost autograd an
    extra copy, and adding it out of place copies the whole output (0.46 s per fp32 step at 4 x 729 tokens)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    if (not isinstance(layer, Conv1D) or layer._forward_hooks or layer._forward_pre_hooks
            or layer.weight.requires_grad or layer.bias.requires_grad):
        return None
    return torch.addmm(layer.bias.to(x.dtype), x.reshape(-1, x.shape[-1]), layer.weight.to(x.dtype))


def use_lean_lora(model):
    """Every LoRA layer's training forward as described above. Nothing else changes: the modules, the state dict
    and the saved adapter are PEFT's; in eval mode (or with merged / disabled / several adapters) PEFT's own
    forward runs."""
    import functools

    import torch
    from peft.tuners.lora import Linear as LoraLinear
    _, DropoutLinear = _dropout_functions()

    def lean_forward(layer, peft_forward, x, *args, **kwargs):
        names = [n for n in layer.active_adapters if n in layer.lora_A]
        if (not layer.training or layer.merged or layer.disable_adapters or args or kwargs or len(names) != 1
                or names[0] in layer.lora_variant or layer.lora_B[names[0]].bias is not None):
            return peft_forward(x, *args, **kwargs)
        name = names[0]
        drop = layer.lora_dropout[name]
        p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
        weight_a = layer.lora_A[name].weight
        if 0 < p < 1:
            low_rank = DropoutLinear.apply(x, weight_a, p)
        else:
            low_rank = torch.nn.functional.dropout(x, p) @ weight_a.to(x.dtype).t()
        low_rank = low_rank.reshape(-1, low_rank.shape[-1])
        fresh = frozen_conv1d_output(layer.base_layer, x)  # (rows, out); not reshaped: a view would cost a copy
        flat = fresh if fresh is not None else layer.base_layer(x).flatten(0, -2)
        weight_b = (layer.lora_B[name].weight * layer.scaling[name]).to(flat.dtype)  # (out, r): small
        if fresh is not None:  # a fresh tensor that nothing has saved: the LoRA term is added in place
            flat = flat.addmm_(low_rank, weight_b.t())
        else:
            flat = torch.addmm(flat, low_rank, weight_b.t())
        return flat.view(*x.shape[:-1], flat.shape[-1])  # result + scaling * lora_B(lora_A(dropout(x)))

    for layer in model.modules():
        if isinstance(layer, LoraLinear) and layer.lora_A and all(a.bias is None for a in layer.lora_A.values()):
            layer.forward = functools.partial(lean_forward, layer, layer.forward)


def add_lora(model, args, quant, gradient_checkpointing):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if quant:
        # Casts layer norms etc. to fp32 and makes checkpointed inputs require grad (peft's recipe for k-bit).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        # Non-reentrant checkpointing: the old (reentrant) kind gives no gradients to LoRA when the block's
        # inputs do not require grad, which they do not here (the embeddings are frozen).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # GPT-2's Conv1D stores weights as (in, out): LoRA must know (fan_in_fan_out=True). The quantizer turns
    # Conv1D into ordinary (out, in) Linear4bit/Linear8bitLt layers, where it must be False.
    # (Our gpt2/modeling_gpt2.Conv1D subclasses transformers' Conv1D, so one isinstance check covers both models.)
    from transformers.pytorch_utils import Conv1D
    c_attn = next(m for name, m in model.named_modules() if name.endswith("c_attn"))
    fan_in_fan_out = isinstance(c_attn, Conv1D)
    config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS,
                        fan_in_fan_out=fan_in_fan_out, bias="none")
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA r={args.lora_r} on {', '.join(LORA_TARGETS)}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)")
    return model



# ---------------------------------------------------------------------------------------------------------
# 5. Training: the recipe for this device, transformers' Trainer, Ctrl-C that still saves.
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Recipe:
    """How this run trains: on a GPU or not, in which precision, quantized or not."""
    cuda: bool
    dtype: str  # "fp32", "bf16" or "fp16"
    quant: str  # "4bit", "8bit" or None
    checkpointing: bool

    @property
    def pure_bf16(self):
        # bf16 without quantization: the base itself is bf16 and no autocast runs (measured faster on a CPU than
        # an fp32 base under autocast). fp16 keeps an fp32 base under autocast (fp16 layer norms would overflow).
        return self.dtype == "bf16" and not self.quant


def choose_recipe(args, model_path):
    cuda = args.device.startswith("cuda")
    quant = pick_quant(args.quant, cuda)
    checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    log(f"Device: {'CUDA GPU' if cuda else 'CPU'}; quantization: {quant or 'none'}; precision: {args.dtype}; "
        f"gradient checkpointing: {'on' if checkpointing else 'off'}; model: "
        f"{'transformers GPT2LMHeadModel' if args.model_impl == 'transformers' else 'gpt2/modeling_gpt2.py'} "
        f"from {model_path}")
    return Recipe(cuda, args.dtype, quant, checkpointing)


def load_model(args, model_path, recipe):
    """The frozen GPT-2 with trainable LoRA adapters, made lean for a CPU run."""
    import torch
    if not recipe.cuda:
        check_memory(args.batch_size, args.max_length, recipe.pure_bf16, recipe.checkpointing)
        keep_freed_memory()  # each step's activations reuse the last step's memory instead of faulting it in anew
    compute_dtype = torch.bfloat16 if recipe.dtype == "bf16" else torch.float16
    base_dtype = torch.bfloat16 if recipe.pure_bf16 else torch.float32
    model = load_base_model(model_path, args.model_impl, recipe.quant, compute_dtype, base_dtype, args.attn_dropout)
    model = add_lora(model, args, recipe.quant, recipe.checkpointing)
    if not recipe.cuda:
        use_lean_dropout(model)
        use_lean_lora(model)
    return model


def detach_lm_head(model):
    """While training, the model returns hidden states and assistant_loss applies the head only where needed.
    Returns the head, to be put back after training."""
    import torch
    base = model.get_base_model()
    lm_head = base.lm_head
    base.lm_head = torch.nn.Identity()
    return lm_head


def to_datasets(train_examples, eval_examples):
    from datasets import Dataset
    return Dataset.from_list(train_examples), Dataset.from_list(eval_examples) if eval_examples else None


def build_trainer(args, recipe, model, head_weight, tokenizer, train_ds, eval_ds):
    """transformers' Trainer for this run (tests and the benchmark wrap this function to add callbacks)."""
    from transformers import Trainer, TrainingArguments
    training_args = TrainingArguments(
        output_dir=args.checkpoint_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps else -1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        # Batches of similar lengths, padded only to their longest example (not to a fixed 512).
        **({"train_sampling_strategy": "group_by_length"}
           if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__ else {"group_by_length": True}),
        length_column_name="length",
        remove_unused_columns=False,  # our collator reads input_ids/labels and ignores "length"
        label_names=["labels"],
        bf16=recipe.dtype == "bf16" and not recipe.pure_bf16,  # autocast (4-bit base with bf16 compute)
        fp16=recipe.dtype == "fp16",
        use_cpu=not recipe.cuda,  # also with --device cpu on a machine with a GPU
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (args.eval_steps and eval_ds is not None) else "no",
        eval_steps=args.eval_steps or None,
        prediction_loss_only=True,  # evaluation needs the loss only (the "logits" here are hidden states)
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        report_to="none",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        # Progress bars in a terminal or a notebook; only the log lines when the output goes to a file.
        disable_tqdm=not sys.stderr.isatty() and "COLAB_RELEASE_TAG" not in os.environ
        and "JPY_PARENT_PID" not in os.environ,
    )
    return Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                   data_collator=PadToLongest(tokenizer.pad_token_id, 8 if recipe.cuda else None),
                   compute_loss_func=assistant_loss(head_weight))


def train_and_evaluate(trainer, last, metrics, out):
    """Eval loss before, training (from checkpoint `last` if any), eval loss after. Returns: interrupted?"""
    if trainer.eval_dataset is not None:
        # Also when resuming: the checkpoint is loaded only inside train(), and a fresh LoRA adapter (lora_B = 0)
        # leaves the base model unchanged, so this is the base model's loss in every case.
        before = trainer.evaluate()["eval_loss"]
        metrics["eval_loss_before"] = before
        log(f"Before training: eval loss {before:.4f}, perplexity {perplexity(before):.2f}")
    interrupted = train_until_interrupted(trainer, last, out)
    if trainer.eval_dataset is not None and not interrupted:
        after = trainer.evaluate()["eval_loss"]
        metrics["eval_loss_after"] = after
        log(f"After training: eval loss {after:.4f}, perplexity {perplexity(after):.2f}")
    metrics["global_step"] = trainer.state.global_step
    metrics["interrupted"] = interrupted
    return interrupted


def train_until_interrupted(trainer, last, out):
    """Ctrl-C (and a polite kill, e.g. Colab's stop button) ends training but still saves the adapter."""
    def on_sigterm(*_):
        raise KeyboardInterrupt
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        if last:
            log(f"Resuming from {last}")
        trainer.train(resume_from_checkpoint=last)
        return False
    except KeyboardInterrupt:
        log(f"\nInterrupted at step {trainer.state.global_step}: saving the adapter trained so far to {out}.")
        return True
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def perplexity(loss):
    return math.exp(min(loss, 50.0))


# ---------------------------------------------------------------------------------------------------------
# 6. Saving: atomically (a temporary directory renamed into place), a loss curve, a merged export.
# ---------------------------------------------------------------------------------------------------------

def save_adapter(trainer, tokenizer, out, metrics):
    history = trainer.state.log_history
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    # Trainer.train() starts a fresh log, so the evaluation before training is added here, at step 0.
    evals = [(0, metrics["eval_loss_before"])] if "eval_loss_before" in metrics else []
    evals += [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    with atomic_path(out) as tmp:
        trainer.model.save_pretrained(tmp)  # the LoRA adapter only (a few MB) + adapter_config.json
        tokenizer.save_pretrained(tmp)      # with the chat template
        plot_losses(os.path.join(tmp, "loss.png"), train, evals, xlabel="optimizer step",
                    ylabel="cross-entropy on assistant tokens", title="Supervised fine-tuning of GPT-2",
                    eval_label="eval loss")
        with open(os.path.join(tmp, "train_metrics.json"), "w", encoding="utf-8") as f:
            json.dump({**metrics, "log_history": history}, f, indent=1)
    log(f"Adapter, tokenizer (with chat template) and loss curve written to {out} "
        f"(step {trainer.state.global_step}). Chat with: python ChatGPT2-base.py --adapter {out}")


def merge_and_export(base_path, adapter_dir, out_dir, model_impl):
    """base + LoRA -> one ordinary GPT-2 checkpoint (full precision: merging into 4-bit weights loses accuracy)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer
    base = gpt2_model_class(model_impl).from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log(f"Merged model written to {out_dir} (loads with transformers' GPT2LMHeadModel.from_pretrained).")


def merge_only(args, model_path):
    if not os.path.isfile(os.path.join(args.out, "adapter_config.json")):
        raise UserError(f"no adapter in {args.out}: train one first (without --merge-only).")
    merge_and_export(model_path, args.out, args.merge_output, args.model_impl)
    return 0


# ---------------------------------------------------------------------------------------------------------
# main: the steps above, in order
# ---------------------------------------------------------------------------------------------------------

def previous_checkpoint(args):
    """The checkpoint to resume from: continue an earlier run only when asked, never overwrite it silently."""
    from transformers.trainer_utils import get_last_checkpoint
    ckpt_dir = args.checkpoint_dir
    last = get_last_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if args.resume and last is None:
        log(f"--resume: no checkpoint in {ckpt_dir}, starting from the beginning.")
    elif last and not args.resume:
        if not args.overwrite:
            raise UserError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                            f"or --overwrite to start over.")
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(ckpt_dir)
        last = None
    return last


def load_examples(args, model_path, fmt):
    """Read, tokenize and window the conversations: (tokenizer with the chat template, training examples,
    held-out examples, the counts for train_metrics.json)."""
    from transformers import AutoConfig, AutoTokenizer
    data_path = resolve_data(args.data)
    conversations, skipped = load_conversations(data_path)
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items())) or "none"
    log(f"Conversations in {data_path}: kept {len(conversations)}, skipped {sum(skipped.values())} ({reasons})")
    if not conversations:
        raise UserError(f"no usable conversation in {data_path}: each needs a user turn answered by an assistant turn.")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.chat_template = fmt.jinja()  # saved with the tokenizer: the chat script uses the same format
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only fills the batch; labels are built by position
    n_positions = getattr(AutoConfig.from_pretrained(model_path), "n_positions", args.max_length)
    if args.max_length > n_positions:
        log(f"--max-length {args.max_length} is longer than the model's context: using {n_positions}.")
        args.max_length = n_positions

    train_convs, eval_convs = split_conversations(conversations, args.eval_size, args.seed)
    train_examples, stats = build_examples(train_convs, tokenizer, fmt, args.max_length)
    eval_examples, _ = build_examples(eval_convs, tokenizer, fmt, args.max_length)
    n_tokens = sum(e["length"] for e in train_examples)
    n_learned = sum(sum(label != IGNORE for label in e["labels"]) for e in train_examples)
    log(f"Training examples: {len(train_examples)} windows of at most {args.max_length} tokens from "
        f"{stats['conversations']} conversations ({stats['split']} split, {stats['cut replies']} over-long "
        f"replies cut); {n_tokens:,} tokens, {n_learned:,} of them learned. Held out: {len(eval_convs)} conversations.")
    counts = {"kept": len(conversations), "skipped": dict(skipped), "train_examples": len(train_examples),
              "eval_conversations": len(eval_convs)}
    return tokenizer, train_examples, eval_examples, counts


def dump_examples(examples, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"input_ids": e["input_ids"], "labels": e["labels"]}) + "\n")
    log(f"Wrote {len(examples)} training examples to {path}.")
    return 0


def main(argv=None):
    args = parse_args(build_parser(), argv)
    fmt = ChatFormat(args.user_name, args.bot_name, args.system_name)
    check_options(args)
    model_path = resolve_model(args.model)
    if args.merge_only:
        return merge_only(args, model_path)
    last = None if args.dump_dataset else previous_checkpoint(args)

    tokenizer, train_examples, eval_examples, metrics = load_examples(args, model_path, fmt)
    if args.dump_dataset:
        return dump_examples(train_examples, args.dump_dataset)
    train_ds, eval_ds = to_datasets(train_examples, eval_examples)
    del train_examples, eval_examples  # the datasets hold a compact copy; Python lists of ints take ~5x more

    recipe = choose_recipe(args, model_path)
    model = load_model(args, model_path, recipe)
    lm_head = detach_lm_head(model)
    trainer = build_trainer(args, recipe, model, lm_head.weight, tokenizer, train_ds, eval_ds)
    metrics.update(precision=recipe.dtype, quant=recipe.quant or "none")
    interrupted = train_and_evaluate(trainer, last, metrics, args.out)
    model.get_base_model().lm_head = lm_head  # the whole model again (for anyone who uses it after training)

    if trainer.is_world_process_zero():
        save_adapter(trainer, tokenizer, args.out, metrics)
        if args.merge and not interrupted:
            del trainer, model  # free the training copy before loading a full-precision one
            merge_and_export(model_path, args.out, args.merge_output, args.model_impl)
    return 130 if interrupted else 0


if __name__ == "__main__":
    run_main(main)  # Ctrl-C outside training (loading, evaluating, merging): nothing to save, exit 130
