"""Task 8: chat with the GPT-2 fine-tuned by Supervised_Fine-Tuning.py.

任务 8：和微调后的 GPT-2 聊天，并保存对话记录（Markdown）作为作业提交。

It loads the base model plus the LoRA adapter (or one merged model), uses the chat template saved with the
adapter's tokenizer — exactly the format it was trained on — keeps the multi-turn history (dropping the
oldest turns when the context window is full), and streams each reply until the model ends it with
<|endoftext|> or starts a new user turn by itself.

Run:
  python ChatGPT2-base.py                                  # model/gpt2-base + adapter model/chatgpt2-base
  python ChatGPT2-base.py --base model/chatgpt2-base-merged   # a merged model (from --merge)
  python ChatGPT2-base.py --ask "What is the capital of France?" --ask "And of Italy?" --save chat.md
  echo "你好" | python ChatGPT2-base.py                     # user turns from stdin
  python ChatGPT2-base.py --compare --ask "Tell me a joke."  # base GPT-2 and fine-tuned side by side
In the chat: /help, /clear (forget the history), /save FILE (Markdown transcript), /exit.
"""
import argparse
import contextlib
import os
import re
import sys

from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

# Pasted into a notebook cell there is no __file__: the cell runs in the repository root (after %cd).
HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
if HERE not in sys.path:  # so that `import gpt2.modeling_gpt2` works from any directory
    sys.path.insert(0, HERE)
from hub_utils import local_or_hub_model  # noqa: E402  (shared by every task script)

DEFAULT_BASE = "model/gpt2-base"
HUB_MODEL = "gpt2"
DEFAULT_ADAPTER = "model/chatgpt2-base"
COMMANDS = """Commands:
  /help        show this help
  /clear       forget the conversation so far
  /save FILE   write the conversation as a Markdown transcript
  /exit        quit (also /quit, Ctrl-D)"""


def fail(message):
    raise SystemExit(f"Error: {message}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with GPT-2 fine-tuned on ShareGPT conversations.")
    p.add_argument("--base", default=None, help=f"base model directory or hub id (default {DEFAULT_BASE}); "
                   "given alone (without --adapter) it is taken as a merged model")
    p.add_argument("--adapter", default=None, help=f"LoRA adapter directory (default {DEFAULT_ADAPTER})")
    p.add_argument("--reference", action="store_true", help="use transformers' GPT2LMHeadModel instead of gpt2/modeling_gpt2.py")
    p.add_argument("--system", default=None, help="an optional system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None, help="fix the sampling for reproducible answers")
    p.add_argument("--ask", action="append", default=[], metavar="TEXT",
                   help="a user turn (repeatable); answers them in order, then exits")
    p.add_argument("--compare", action="store_true", help="answer with the base model and the fine-tuned one side by side")
    p.add_argument("--compare-base", default=DEFAULT_BASE, help="base model for --compare when --base is a merged model")
    p.add_argument("--save", default=None, metavar="FILE", help="write the Markdown transcript to FILE at the end")
    args, _ = p.parse_known_args(argv)  # tolerate a notebook kernel's own arguments
    return args


# ---------------------------------------------------------------------------------------------------------
# Loading: local directory first, then the hub (saying so); a clear sentence when neither works.
# ---------------------------------------------------------------------------------------------------------

def resolve_model(path):
    """Return a local directory with the model, downloading from the hub only when it is not on disk."""
    return local_or_hub_model(path, HUB_MODEL if path == DEFAULT_BASE else path, HERE)


def model_class(reference):
    if reference:
        from transformers import GPT2LMHeadModel
        return GPT2LMHeadModel
    try:
        from gpt2.modeling_gpt2 import GPT2LMHeadModel
    except Exception as e:
        fail(f"cannot import gpt2/modeling_gpt2.py ({type(e).__name__}: {e}); finish it, or pass --reference.")
    return GPT2LMHeadModel


def load_models(args):
    """Return (fine-tuned model, base model or None, tokenizer, description)."""
    import torch
    from transformers import AutoTokenizer
    merged = args.adapter is None and args.base is not None
    base_dir = resolve_model(args.base or DEFAULT_BASE)
    adapter = None if merged else (args.adapter or DEFAULT_ADAPTER)
    if adapter and not os.path.isdir(adapter) and not os.path.isabs(adapter) and os.path.isdir(os.path.join(HERE, adapter)):
        adapter = os.path.join(HERE, adapter)
    if adapter and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        fail(f"no fine-tuned adapter in {adapter}: run Supervised_Fine-Tuning.py first "
             f"(or pass --base with a merged model).")
    tok_dir = adapter or base_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if not tokenizer.chat_template:
        fail(f"{tok_dir} has no chat template: pass --adapter with the directory Supervised_Fine-Tuning.py wrote "
             f"(or --base alone with its merged model).")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cls = model_class(args.reference)
    try:
        model = cls.from_pretrained(base_dir)
    except (OSError, ValueError) as e:
        fail(f"could not load a GPT-2 from {base_dir} ({type(e).__name__}: {str(e).splitlines()[0]}).")
    base = None
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
        # --compare runs the same weights with the adapter switched off: no second copy in memory.
    elif args.compare:
        base = cls.from_pretrained(resolve_model(args.compare_base)).to(device).eval()
    model = model.to(device).eval()
    what = f"{base_dir} + adapter {adapter}" if adapter else f"{base_dir} (merged)"
    return model, base, tokenizer, what


# ---------------------------------------------------------------------------------------------------------
# The chat format comes from the template; generation streams and stops at the end of the reply.
# ---------------------------------------------------------------------------------------------------------

def speaker_prefixes(tokenizer):
    """Read the speakers' prefixes ("Human:", "chatgpt2-base:") off the saved chat template."""
    probe = "PROBE-7f3a"
    turn = [{"role": "user", "content": probe}]
    user_text = tokenizer.apply_chat_template(turn, tokenize=False)
    prompt_text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return user_text.split(probe)[0].strip(), prompt_text[len(user_text):].strip()


def prompt_ids(tokenizer, messages, budget):
    """Token ids of the conversation + the generation prompt, dropping the oldest turns while too long.
    Returns (ids, messages actually used)."""
    messages = list(messages)
    while True:
        # sanitize_control_tokens: "<|endoftext|>" typed by the user stays text, as in training.
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False, sanitize_control_tokens=True)
        turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
        if len(ids) <= budget or len(turns) <= 1:
            break
        # Drop the oldest question and its answer(s), so the history still starts with a user turn.
        del messages[turns[0]]
        while len(messages) > 1 and messages[turns[0]]["role"] == "assistant":
            del messages[turns[0]]
    if len(ids) > budget:  # one message longer than the whole window: keep its end
        ids = ids[-budget:]
    return ids, messages


class ReplyStream(BaseStreamer, StoppingCriteria):
    """Streamer and stopping criterion in one: prints the reply as it is generated and stops when the model
    begins a new user turn ("\\nHuman:") by itself. Text that might be the start of that marker is held back,
    so the marker is never printed."""

    def __init__(self, tokenizer, prompt_len, user_prefix, out=None):
        self.tokenizer, self.prompt_len, self.out = tokenizer, prompt_len, out
        self.marker = re.compile(r"(?:^|\n)[ \t]*" + re.escape(user_prefix))
        self.user_prefix = user_prefix
        self.ids, self.printed, self.first_put = [], 0, True

    def text(self):
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def reply(self):
        """The reply so far, cut at a new user turn."""
        text = self.text()
        m = self.marker.search(text)
        return (text[:m.start()] if m else text).strip()

    # -- streamer interface (generate calls put() with the prompt first, then each new token) ----------
    def put(self, value):
        if self.first_put:
            self.first_put = False
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        if self.out is not None:
            self._flush(final=False)

    def end(self):
        if self.out is not None:
            self._flush(final=True)

    def _flush(self, final):
        text = self.text().lstrip()  # the reply starts after "chatgpt2-base:"; its leading space is not shown
        m = self.marker.search(text)
        safe = m.start() if m else len(text.rstrip() if final else text.rstrip("\ufffd"))  # \ufffd: half a character
        if not final and not m:
            # Hold back a last line that could still grow into "Human:" (or the whole reply, if it might).
            nl = text.rfind("\n", 0, safe)
            tail = text[nl + 1 if nl >= 0 else 0:safe].lstrip(" \t")
            if self.user_prefix.startswith(tail):
                safe = max(nl, 0)
        if safe > self.printed:
            self.out.write(text[self.printed:safe])
            self.out.flush()
            self.printed = safe

    # -- stopping criterion interface ------------------------------------------------------------------
    def __call__(self, input_ids, scores, **kwargs):
        import torch
        text = self.tokenizer.decode(input_ids[0, self.prompt_len:], skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), bool(self.marker.search(text)), dtype=torch.bool,
                          device=input_ids.device)


def generate_reply(model, tokenizer, messages, args, user_prefix, out=None):
    """One assistant reply to `messages` (the last one a user turn); streamed to `out` when given."""
    import torch
    from transformers import StoppingCriteriaList
    window = getattr(model.config, "n_positions", 1024)
    max_new = min(args.max_new_tokens, window // 2)
    ids, used = prompt_ids(tokenizer, messages, window - max_new)
    input_ids = torch.tensor([ids], device=model.device)
    stream = ReplyStream(tokenizer, len(ids), user_prefix, out)
    sampling = args.temperature > 0
    kwargs = dict(do_sample=sampling, temperature=args.temperature, top_p=args.top_p) if sampling else dict(do_sample=False)
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new,
                       repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.eos_token_id, streamer=stream,
                       stopping_criteria=StoppingCriteriaList([stream]), **kwargs)
    return stream.reply(), len(used) < len(messages)


def write_transcript(path, transcript, what, args):
    lines = ["# ChatGPT2-base transcript", "", f"- model: {what}",
             f"- temperature {args.temperature}, top-p {args.top_p}, repetition penalty {args.repetition_penalty}, "
             f"max new tokens {args.max_new_tokens}, seed {args.seed}", ""]
    for speaker, text in transcript:
        lines += [f"**{speaker}:** {text}", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"(transcript saved to {path})", flush=True)


def user_turns(args):
    """--ask texts, else stdin: typed at a prompt in a terminal, read line by line when piped."""
    if args.ask:
        yield from args.ask
        return
    if sys.stdin is not None and sys.stdin.isatty():
        while True:
            try:
                yield input("> ")
            except EOFError:
                print()
                return
    elif sys.stdin is not None:
        for line in sys.stdin:
            if line.strip():
                yield line.rstrip("\n")


def main(argv=None):
    args = parse_args(argv)
    if args.seed is not None:
        from transformers import set_seed
        set_seed(args.seed)
    model, base, tokenizer, what = load_models(args)
    user_prefix, bot_prefix = speaker_prefixes(tokenizer)
    user_name, bot_name = user_prefix.rstrip(":"), bot_prefix.rstrip(":")
    interactive = not args.ask and sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {what}. /help lists the commands.")

    system = [{"role": "system", "content": args.system}] if args.system else []
    history, base_history, transcript = list(system), list(system), []

    def answer(label, net, msgs, adapter_off=False):
        sys.stdout.write(f"{label}: ")
        sys.stdout.flush()
        try:
            with net.disable_adapter() if adapter_off else contextlib.nullcontext():
                reply, trimmed = generate_reply(net, tokenizer, msgs, args, user_prefix, sys.stdout)
        except KeyboardInterrupt:
            reply, trimmed = "(interrupted)", False
        print(flush=True)
        if trimmed:
            print("(the oldest turns no longer fit in the context window and were left out)", flush=True)
        return reply

    for text in user_turns(args):
        command = text.strip()
        if command.startswith("/"):
            name, _, rest = command.partition(" ")
            if name in ("/exit", "/quit"):
                break
            elif name == "/help":
                print(COMMANDS)
            elif name == "/clear":
                history, base_history = list(system), list(system)
                print("(history cleared)")
            elif name == "/save":
                if rest.strip():
                    write_transcript(rest.strip(), transcript, what, args)
                else:
                    print("usage: /save FILE")
            else:
                print(f"unknown command {name}; /help lists the commands")
            continue
        if not command:
            continue
        if not interactive:
            print(f"{user_name}: {text}")
        transcript.append((user_name, text))
        history.append({"role": "user", "content": text})
        if args.compare:
            base_history.append({"role": "user", "content": text})
            reply = answer(f"[base GPT-2] {bot_name}", base if base is not None else model, base_history,
                           adapter_off=base is None)
            base_history.append({"role": "assistant", "content": reply})
            transcript.append((f"{bot_name} (base GPT-2)", reply))
            label = f"[fine-tuned] {bot_name}"
        else:
            label = bot_name
        reply = answer(label, model, history)
        history.append({"role": "assistant", "content": reply})
        transcript.append((bot_name + (" (fine-tuned)" if args.compare else ""), reply))
    if not transcript and not interactive and not args.ask:
        print("No user turns came from stdin: pass --ask TEXT, or run in a terminal to chat.")
    if args.save:
        write_transcript(args.save, transcript, what, args)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat quietly
        print()
        sys.exit(0)
