"""Task 8: chat with the GPT-2 fine-tuned by Supervised_Fine-Tuning.py.

任务 8：和微调后的 GPT-2 聊天，并保存对话记录（Markdown）作为作业提交。

It loads the base model plus the LoRA adapter (or one merged model) and chats through chat_engine.py, the
engine Task 0 uses too: the chat template saved with the adapter's tokenizer (exactly the format it was
trained on), the multi-turn history (the oldest turns left out when the context window is full), streaming,
and the same stop rule as Task 0: the reply ends at <|endoftext|> or where the model starts a new user turn
("Human:") by itself. What is Task 8's own is here: base + adapter, --compare, and the defaults.

Run:
  python ChatGPT2-base.py                                  # model/gpt2-base + adapter model/chatgpt2-base
  python ChatGPT2-base.py --model model/chatgpt2-base-merged   # a merged model (from --merge)
  python ChatGPT2-base.py --ask "What is the capital of France?" --ask "And of Italy?" --save chat.md
  echo "你好" | python ChatGPT2-base.py                     # user turns from stdin
  python ChatGPT2-base.py --compare --ask "Tell me a joke."  # base GPT-2 and fine-tuned side by side
In the chat: /help, /clear (forget the history), /save FILE (Markdown transcript), /exit.
"""
import os
import sys
from dataclasses import dataclass

from chat_engine import Chat, ChatEngine, Options, run_terminal  # shared with Task 0
from course_utils import (
    ArgumentParser,
    UserError,
    gpt2_model_class,
    local_or_hub,
    parse_args,
    pick_device,
    run_main,
    script_dir,
    use_fused_gelu,
)

HERE = script_dir(globals())
DEFAULT_BASE = "model/gpt2-base"
HUB_MODEL = "gpt2"
DEFAULT_ADAPTER = "model/chatgpt2-base"


def build_parser():
    p = ArgumentParser(description="Chat with GPT-2 fine-tuned on ShareGPT conversations.")
    p.add_argument("--model", default=None, help=f"base model directory or hub id (default {DEFAULT_BASE}); "
                   "given alone (without --adapter) it is taken as a merged model")
    p.add_argument("--adapter", default=None, help=f"LoRA adapter directory (default {DEFAULT_ADAPTER})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: a GPU when there is one")
    p.add_argument("--model-impl", choices=["repo", "transformers"], default="repo",
                   help="which GPT-2 code: repo = gpt2/modeling_gpt2.py (Task 4), transformers = GPT2LMHeadModel")
    p.add_argument("--system", default=None, help="an optional system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None, help="fix the sampling for reproducible answers")
    p.add_argument("--ask", action="append", default=[], metavar="TEXT",
                   help="a user turn (repeatable); answers them in order, then exits")
    p.add_argument("--compare", action="store_true",
                   help="answer with the base model and the fine-tuned one side by side")
    p.add_argument("--compare-base", default=DEFAULT_BASE,
                   help="base model for --compare when --model is a merged model")
    p.add_argument("--save", default=None, metavar="FILE", help="write the Markdown transcript to FILE at the end")
    # The names of earlier versions still work (not shown in --help).
    p.add_alias("--base", dest="model")
    p.add_alias("--reference", dest="model_impl", const="transformers")
    return p


# ---------------------------------------------------------------------------------------------------------
# Loading: local directory first, then the hub (saying so); a clear sentence when neither works.
# ---------------------------------------------------------------------------------------------------------

def resolve_model(path):
    """Return a local directory with the model, downloading from the hub only when it is not on disk."""
    return local_or_hub(path, HUB_MODEL if path == DEFAULT_BASE else path, HERE)


def load_models(args):
    """Return (fine-tuned model, base model or None, tokenizer, description)."""
    from transformers import AutoTokenizer
    merged = args.adapter is None and args.model is not None
    base_dir = resolve_model(args.model or DEFAULT_BASE)
    adapter = None if merged else (args.adapter or DEFAULT_ADAPTER)
    if adapter and not os.path.isdir(adapter) and os.path.isdir(os.path.join(HERE, adapter)):  # run from elsewhere
        adapter = os.path.join(HERE, adapter)
    if adapter and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UserError(f"no fine-tuned adapter in {adapter}: run Supervised_Fine-Tuning.py first "
                        f"(or pass --model with a merged model).")
    tok_dir = adapter or base_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if not tokenizer.chat_template:
        raise UserError(f"{tok_dir} has no chat template: pass --adapter with the directory "
                        f"Supervised_Fine-Tuning.py wrote (or --model alone with its merged model).")
    device = pick_device(args.device)
    cls = gpt2_model_class(args.model_impl)
    try:
        model = cls.from_pretrained(base_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a GPT-2 from {base_dir} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                        f"pass --model with a GPT-2 directory or hub id.") from None
    use_fused_gelu(model)  # the activation its config names (a GPT-2 from Pretraining.py has the exact GELU)
    base = None
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
        # --compare runs the same weights with the adapter switched off: no second copy in memory.
    elif args.compare:
        base = cls.from_pretrained(resolve_model(args.compare_base))
        use_fused_gelu(base)
        base = base.to(device).eval()
    model = model.to(device).eval()
    what = f"{base_dir} + adapter {adapter}" if adapter else f"{base_dir} (merged)"
    return model, base, tokenizer, what


# ---------------------------------------------------------------------------------------------------------
# The chat: the engine's, with Task 8's speakers read off the saved template
# ---------------------------------------------------------------------------------------------------------

def speaker_names(tokenizer):
    """The speakers' names ("Human", "chatgpt2-base") as the saved chat template writes them."""
    probe = "PROBE-7f3a"
    turn = [{"role": "user", "content": probe}]
    user_text = tokenizer.apply_chat_template(turn, tokenize=False)
    prompt_text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return user_text.split(probe)[0].strip().rstrip(":"), prompt_text[len(user_text):].strip().rstrip(":")


def options(args):
    return Options(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed)


@dataclass
class SideBySide(Chat):
    """--compare: every question goes first to the base model, then to the fine-tuned one (one transcript)."""
    base: Chat = None

    def ask(self, text):
        self.base.ask(text)
        return super().ask(text)

    def handle(self, line):
        if line.strip() == "/clear":
            self.base.history.clear()
        return super().handle(line)


def main(argv=None):
    args = parse_args(build_parser(), argv)
    model, base, tokenizer, what = load_models(args)
    user, bot = speaker_names(tokenizer)
    common = dict(system=args.system or "", user_name=user, about=what)
    tuned = ChatEngine(model, tokenizer, bot, batching="generate")
    chat, engines = Chat(tuned, options(args), bot_name=bot, **common), [tuned]
    if args.compare:  # the base model: a second one, or the same weights with the adapter switched off
        off = base is None
        plain = ChatEngine(model if off else base, tokenizer, bot, batching="generate",
                           around=model.disable_adapter if off else None)
        first = Chat(plain, options(args), bot_name=f"{bot} (base GPT-2)", label=f"[base GPT-2] {bot}", **common)
        chat = SideBySide(tuned, options(args), bot_name=f"{bot} (fine-tuned)", label=f"[fine-tuned] {bot}",
                          transcript=first.transcript, record_questions=False, base=first, **common)
        engines.append(plain)
    interactive = not args.ask and sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {what}. /help lists the commands.")
    try:
        if not run_terminal(chat, args.ask) and not interactive:
            print("No user turns came from stdin: pass --ask TEXT, or run in a terminal to chat.")
    finally:
        for engine in engines:
            engine.close()
    if args.save:
        print(f"(transcript saved to {chat.save(args.save, 'ChatGPT2-base transcript')})", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
