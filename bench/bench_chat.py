"""Benchmark for Task 0: what ChatGLM.py's terminal front end costs on top of `model.generate`.

Both sides produce the same number of tokens with greedy decoding on the same model (min_new_tokens =
max_new_tokens, so neither stops early), in the same process, interleaved run by run:
  (a) baseline: `model.generate(input_ids, do_sample=False, max_new_tokens=N)` alone, no streamer;
  (b) ChatGLM.py's terminal path: `TerminalChat.ask()`: chat template, history trimming, generate() in a thread,
      TokenStreamer decoding every token, stop-string check, writing each piece to an output stream.
It prints tokens/s of both and the overhead of (b) (the target is under 10%), and the time to first token:
(a) is generate(max_new_tokens=1), i.e. prefill plus one step; (b) is from ask() until the first new token reaches
the streamer, and until the first text is written (later when the first tokens are parts of one Chinese character:
the terminal never prints half a character). Times are the best of --runs (least disturbed by other jobs).
Real chat weights cannot be downloaded here, so the model is a GPT-2 with random weights (default 6 layers,
384 wide, as a small chat model on a laptop CPU) and a byte-level BPE tokenizer trained on a few lines of text.

Threads: one by default (--threads). On a busy machine (here: 2 cores shared with other jobs) PyTorch's OpenMP
threads in the main thread wait for each other so badly that generate() in the main thread ran 5x slower than the
same call in a worker thread: that would be measured as a large negative "overhead". With one thread both sides
run the same arithmetic, and what differs is the front end. --threads 0 keeps PyTorch's default.

Run:  python bench/bench_chat.py [--new-tokens 128] [--runs 5] [--layers 6] [--width 384] [--threads 1]
"""
import argparse
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ChatGLM  # noqa: E402

TEXT = ("你好 世界 今天天气很好 我们一起学习自然语言处理 语言模型会根据上文预测下一个词 什么情况下商贩会售卖淹死的鱼？ "
        "两杯50度的巧克力混合起来是多少度？ 如何向盲人推销VR眼镜？ the quick brown fox jumps over the lazy dog ")
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build(layers, width, context):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TEXT] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = TEMPLATE
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 64), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                        initializer_range=0.1)
    return GPT2LMHeadModel(config).eval(), tokenizer


class TimedStreamer(ChatGLM.TokenStreamer):
    """ChatGLM's streamer, noting when the first new token arrived (the prompt comes in the first put)."""
    first_token = None

    def put(self, value):
        if self.prompt_seen and TimedStreamer.first_token is None:
            TimedStreamer.first_token = time.perf_counter()
        super().put(value)


class TimedSink(io.StringIO):
    """The terminal's output stream: remembers when the first piece of the answer arrived."""

    def __init__(self, prefix):
        super().__init__()
        self.prefix, self.first = prefix, None

    def write(self, text):
        if self.first is None and text and text != self.prefix:
            self.first = time.perf_counter()
        return super().write(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: PyTorch's default)")
    args, _ = p.parse_known_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    n = args.new_tokens
    model, tokenizer = build(args.layers, args.width, context=1024)
    model.generation_config.min_new_tokens = n  # both sides produce exactly n tokens
    engine = ChatGLM.ChatEngine(model, tokenizer, "bench")
    question = "什么情况下商贩会售卖淹死的鱼？"
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": question}])])
    settings = ChatGLM.Settings(max_new_tokens=n, temperature=0, top_p=1.0)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: GPT-2 {args.layers} layers x {args.width}, {params:.1f}M parameters, random weights, fp32")
    print(f"machine: {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"prompt {ids.shape[1]} tokens, {n} new tokens, greedy, best of {args.runs} runs")

    def baseline(max_new):
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                             min_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()

    ChatGLM.TokenStreamer = TimedStreamer  # instrument the terminal path (the engine looks the class up per reply)

    def terminal():
        sink = TimedSink("bench> ")
        chat = ChatGLM.TerminalChat(engine, settings, out=sink)
        TimedStreamer.first_token = None
        start = time.perf_counter()
        reply = chat.ask(question)
        return time.perf_counter() - start, TimedStreamer.first_token - start, sink.first - start, reply

    baseline(8), terminal()  # warm-up: first-call allocations, lazy imports
    plain, front, ttft_plain, ttft_front, ttft_text = [], [], [], [], []
    for _ in range(args.runs):
        seconds, new_ids = baseline(n)
        plain.append(seconds)
        seconds, first_token, first_text, reply = terminal()
        front.append(seconds)
        ttft_front.append(first_token)
        ttft_text.append(first_text)
        ttft_plain.append(baseline(1)[0])
        assert reply.completion_tokens == len(new_ids) == n
        assert reply.text == tokenizer.decode(new_ids, skip_special_tokens=True), "both sides must say the same"

    a, b = min(plain), min(front)
    print(f"(a) model.generate alone      {n / a:8.1f} tokens/s   ({a:.3f} s; median {statistics.median(plain):.3f} s)")
    print(f"(b) ChatGLM.py terminal path  {n / b:8.1f} tokens/s   ({b:.3f} s; median {statistics.median(front):.3f} s)")
    print(f"overhead of (b) over (a): {100 * (b / a - 1):+.1f}%  (target < 10%)")
    print(f"time to first token: (a) {1000 * min(ttft_plain):.1f} ms   (b) {1000 * min(ttft_front):.1f} ms "
          f"(first text printed: {1000 * min(ttft_text):.1f} ms)")


if __name__ == "__main__":
    main()
