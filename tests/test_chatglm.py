"""Task 0 (ChatGLM.py): the chat engine as Task 0 uses it, the terminal front end and the loading errors.

A tiny GPT-2 with random weights and a byte-level BPE tokenizer (with a chat template) is built once and
saved with save_pretrained, so the real loading code runs. Its answers are gibberish: the tests check
structure (greedy answers equal model.generate, pieces add up to the text, token counts, stop strings,
trimming, commands, transcripts, error messages), never content. The tiny model is transformers' GPT-2, so the
engine serves it with continuous batching; chat_engine.py's own tests (test_chat_engine.py) cover both backends.
The API and the web page are tested in test_chatglm_api.py and test_chatglm_web.py.
"""
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ChatGLM

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ChatGLM.py"

# Training text for the tokenizer. No ASCII Markdown characters (* _ # ` < > [ ] $ . - +) and no newline, so the
# random model cannot write Markdown: the web test can compare the rendered page text with the expected reply.
CORPUS = ("你好 世界 今天天气很好 我们一起学习自然语言处理 语言模型会根据上文预测下一个词 "
          "什么情况下商贩会售卖淹死的鱼？ 两杯50度的巧克力混合起来是多少度？ 如何向盲人推销VR眼镜？ "
          "粗体 hello world the quick brown fox jumps over the lazy dog 1234567890 "
          "a chat model answers questions, and a student reads the answers, then asks again ")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def make_tiny_chat_model(path, n_positions=256, n_embd=32, n_layer=2, seed=0):
    """A tiny GPT-2 chat model on disk: tokenizer (with chat template) + random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe.train_from_iterator([CORPUS] * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|pad|>", additional_special_tokens=specials[1:2])
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=2, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                        pad_token_id=ids("<|pad|>"), initializer_range=0.1)  # 0.02 repeats one token forever
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "tiny-chat"))


@pytest.fixture(scope="session")
def engine(tiny_dir):
    model, tokenizer, device = ChatGLM.load_model(tiny_dir, device="cpu", dtype="fp32")
    assert device == "cpu"
    engine = ChatGLM.ChatEngine(model, tokenizer, "tiny-chat")
    yield engine
    engine.close()


def reference(engine, messages, max_new_tokens):
    """What plain model.generate (greedy) says for the same conversation: (text, new token ids, prompt ids).
    The text is the decoded reply without its outer white space, as every front end shows a reply."""
    tok = engine.tokenizer
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True).strip(), new, ids[0].tolist()


def greedy(engine, messages, max_new_tokens=16, **kwargs):
    reply = engine.reply(messages, max_new_tokens=max_new_tokens, temperature=0, **kwargs)
    pieces = list(reply)
    return reply, pieces


def run_script(*args, cwd=None, stdin="", timeout=120, env=None):
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", **(env or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd or ROOT, input=stdin, text=True,
                          capture_output=True, timeout=timeout, env=full_env)


# ------------------------------------------------------------------------------------------------ the engine
QUESTIONS = [[{"role": "user", "content": "你好"}],
             [{"role": "system", "content": "你是一个语言模型"}, {"role": "user", "content": "今天天气很好"},
              {"role": "assistant", "content": "我们一起学习"}, {"role": "user", "content": "hello world"}]]


@pytest.mark.parametrize("messages", QUESTIONS)
def test_greedy_reply_equals_model_generate(engine, messages):
    reply, pieces = greedy(engine, messages, max_new_tokens=24)
    text, new_ids, prompt_ids = reference(engine, messages, 24)
    assert len(pieces) > 1, "the reply should stream in several pieces"
    assert "".join(pieces) == reply.text == text
    assert reply.prompt_tokens == len(prompt_ids)
    assert reply.completion_tokens == len(new_ids)
    eos = engine.tokenizer.eos_token_id
    assert reply.finish_reason == ("stop" if new_ids[-1] == eos else "length")


def test_sampling_settings_reach_generate(engine):
    """A seeded request samples like generate() after torch.manual_seed: same seed, same answer."""
    messages = QUESTIONS[0]
    texts = []
    for seed in (1, 1, 2):
        texts.append("".join(engine.reply(messages, max_new_tokens=24, temperature=1.5, top_p=1.0, seed=seed)))
    torch.manual_seed(1)
    ids = engine.tokenizer(engine.render(messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.5,
                                top_p=1.0, top_k=50, max_new_tokens=24, pad_token_id=engine.tokenizer.pad_token_id)
    assert texts[0] == texts[1] == engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert texts[2] != texts[0]


def test_stop_strings_cut_the_reply(engine):
    messages = QUESTIONS[0]
    full, _ = greedy(engine, messages, max_new_tokens=32)
    text = full.text
    # pick stop strings that first occur in the middle of the answer; two characters may span two pieces
    for start in (len(text) // 3, len(text) // 2):
        stop = text[start:start + 2]
        cut = text.index(stop)
        reply, pieces = greedy(engine, messages, max_new_tokens=32, stop=["never-appears", stop])
        assert "".join(pieces) == reply.text == text[:cut].rstrip()
        assert reply.finish_reason == "stop"
        assert stop not in "".join(pieces)


def test_cancel_ends_generation_and_frees_the_model(engine):
    reply = engine.reply(QUESTIONS[0], max_new_tokens=200, temperature=0, min_new_tokens=200)
    received = []
    for piece in reply:
        received.append(piece)
        if len(received) == 2:
            reply.cancel()
    assert reply.finish_reason == "interrupted"
    assert reply.completion_tokens < 200
    assert reply.text == "".join(received)
    assert not engine.paged.replies, "the scheduler must have dropped the cancelled request"
    assert list(engine.reply(QUESTIONS[0], max_new_tokens=4, temperature=0)), "the model is free again"


def test_abandoned_reply_is_closed(engine):
    """A reader that goes away (closed page, dropped connection) must not keep the model busy."""
    reply = engine.reply(QUESTIONS[0], max_new_tokens=200, temperature=0)
    next(iter(reply))
    reply.close()
    assert reply.cancelled.is_set() and not engine.paged.replies
    assert list(engine.reply(QUESTIONS[0], max_new_tokens=4, temperature=0))


def test_history_is_trimmed_to_the_context_window(engine):
    """Oldest pairs go first, the system prompt and the last question stay, and no more is dropped than needed."""
    ctx = engine.context_window  # 256 for the tiny model
    system = [{"role": "system", "content": "你是一个语言模型"}]
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"问题{i} 今天天气很好"},
                  {"role": "assistant", "content": "我们一起学习自然语言处理 " * 3}]
    turns.append({"role": "user", "content": "最后 hello world"})
    max_new = 64
    assert len(engine.prompt_ids(system + turns)) + max_new > ctx, "the test needs an overlong history"
    kept, ids, new_max, dropped = engine.fit(system + turns, max_new)
    assert kept[0] == system[0] and kept[-1] == turns[-1]
    assert kept[1:] == turns[2 * dropped:]
    assert len(ids) + max_new <= ctx and new_max == max_new
    assert len(engine.prompt_ids(system + turns[2 * (dropped - 1):])) + max_new > ctx, "dropped one pair too many"
    reply = engine.reply(system + turns, max_new_tokens=max_new, temperature=0)
    reply.cancel()  # not needed here: leave the model to the next test
    assert reply.dropped == dropped and reply.prompt_tokens == len(ids)
    # a single question longer than the window cannot be answered: a clear error, not a crash inside generate
    with pytest.raises(ChatGLM.ContextTooLong):
        engine.reply([{"role": "user", "content": "今天天气很好 " * 300}], max_new_tokens=8)


def test_untemplated_model_gets_a_plain_prompt(engine):
    bare = ChatGLM.ChatEngine(engine.model, engine.tokenizer, "bare", batching="generate")
    bare.has_template = False
    prompt = bare.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert prompt == "S\n\nUser: Q\nAssistant:"


# Like Llama-2's or Gemma's templates: no system role, and user/assistant must alternate.
STRICT_TEMPLATE = ("{% for m in messages %}"
                   "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                   "{% elif loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                   "{% endif %}{% endfor %}" + CHAT_TEMPLATE)


def test_a_strict_template_merges_the_system_prompt_or_says_what_is_wrong(engine, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", STRICT_TEMPLATE)
    prompt = engine.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert prompt == "<|im_start|>user S\n\nQ<|im_end|><|im_start|>assistant "
    with pytest.raises(ChatGLM.PromptError, match="alternate"):
        engine.reply([{"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}])


# ------------------------------------------------------------------------------------------------ terminal
def test_terminal_commands_and_transcripts(engine, tmp_path):
    out = io.StringIO()
    chat = ChatGLM.Chat(engine, ChatGLM.Options(max_new_tokens=12, temperature=0.8), user_name="用户", out=out)
    assert chat.handle("/set temperature=0")
    assert chat.handle("/set max_new_tokens=oops") and "用法" in out.getvalue()
    assert chat.handle("/set system=你是一个语言模型")
    assert chat.options.temperature == 0 and chat.options.max_new_tokens == 12 and chat.system == "你是一个语言模型"
    assert chat.handle("你好")
    assert chat.handle("今天天气很好")
    # the second answer saw the first exchange and the system prompt
    expected, _, _ = reference(engine, chat.messages()[:-1], 12)
    assert chat.history[-1]["content"] == expected
    assert out.getvalue().count("tiny-chat: ") == 2
    assert chat.handle(f"/save {tmp_path / 'chat.json'}")
    saved = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))
    assert saved == chat.messages() and saved[0]["role"] == "system" and len(saved) == 5
    assert chat.handle(f"/save {tmp_path / 'chat.md'}")
    markdown = (tmp_path / "chat.md").read_text(encoding="utf-8")
    assert "**用户:** 今天天气很好\n" in markdown and f"**tiny-chat:** {expected}\n" in markdown
    assert chat.handle("/help") and "/save FILE" in out.getvalue()
    assert chat.handle("/nonsense") and "不认识的命令" in out.getvalue()
    assert chat.handle("/clear") and chat.history == []
    assert chat.handle("/exit") is False


def test_a_save_path_that_cannot_be_written_does_not_end_the_chat(engine, tmp_path):
    (tmp_path / "file").write_text("")
    out = io.StringIO()
    chat = ChatGLM.Chat(engine, ChatGLM.Options(max_new_tokens=4, temperature=0), out=out)
    assert chat.handle(f"/save {tmp_path / 'file' / 'chat.md'}")  # a directory below a file
    assert "无法写入" in out.getvalue() and "chat.md" in out.getvalue()
    assert chat.handle("你好") and len(chat.history) == 2


class InterruptingOut(io.StringIO):
    """Raises KeyboardInterrupt while the answer is being printed, as Ctrl-C would."""

    def __init__(self, after):
        super().__init__()
        self.writes, self.after = 0, after

    def write(self, text):
        self.writes += 1
        if self.writes == self.after:
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_not_the_chat(engine):
    out = InterruptingOut(after=4)  # 1: the name prefix, 2-3: two pieces, 4: Ctrl-C
    chat = ChatGLM.Chat(engine, ChatGLM.Options(max_new_tokens=200, temperature=0), out=out)
    reply = chat.ask("你好")
    assert reply.finish_reason == "interrupted" and reply.completion_tokens < 200
    assert "[已中断" in out.getvalue()
    assert chat.history[-1] == {"role": "assistant", "content": reply.text}
    chat.options.max_new_tokens = 8
    second = chat.ask("hello world")  # the conversation goes on
    assert second.finish_reason in ("stop", "length") and len(chat.history) == 4


@pytest.fixture(scope="session")
def endless_dir(tmp_path_factory):
    """A model that never stops by itself within its long window: its end-of-turn embedding is zero, so that
    logit is 0 while the largest of the other ~400 random logits is positive: greedy never picks it."""
    from transformers import AutoModelForCausalLM
    path = make_tiny_chat_model(tmp_path_factory.mktemp("endless") / "endless", n_positions=8192)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.transformer.wte.weight[model.config.eos_token_id] = 0
    model.save_pretrained(path)
    return str(path)


def test_ctrl_c_signal_in_a_real_terminal(endless_dir):
    """A real SIGINT in a pseudo-terminal: the answer stops, the prompt comes back, /exit leaves cleanly."""
    import pty
    import select
    import signal
    pid, fd = pty.fork()
    if pid == 0:  # the child: the script in a terminal, asked for an answer far longer than the test waits
        os.execve(sys.executable, [sys.executable, str(SCRIPT), "--model", endless_dir, "--temperature", "0",
                                   "--max-new-tokens", "8000"],
                  dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8"))
    output, cursor = b"", 0

    def read_until(marker, seconds=60):
        """Reads the child's terminal until `marker` appears after the previous marker found."""
        nonlocal output, cursor
        deadline = time.time() + seconds
        while marker.encode() not in output[cursor:] and time.time() < deadline:
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            try:
                output += os.read(fd, 4096)
            except OSError:  # the child is gone
                break
        found = output.find(marker.encode(), cursor)
        if found >= 0:
            cursor = found + len(marker.encode())
        return found >= 0

    try:
        assert read_until("用户> "), output.decode(errors="replace")
        os.write(fd, "你好\n".encode())
        assert read_until("endless: ")
        time.sleep(0.5)
        os.kill(pid, signal.SIGINT)
        assert read_until("[已中断"), output.decode(errors="replace")
        assert read_until("用户> "), output.decode(errors="replace")  # the prompt is back
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)


def run_main(monkeypatch, *argv):
    """ChatGLM.main() in this process, as `python ChatGLM.py ARGV` would run it (plus a notebook's stray -f)."""
    monkeypatch.setattr(sys, "argv", ["ChatGLM.py", *argv, "-f", "/tmp/kernel.json"])
    ChatGLM.main()


def test_ask_and_save_from_the_command_line(engine, tiny_dir, tmp_path, monkeypatch, capsys):
    run_main(monkeypatch, "--model", tiny_dir, "--dtype", "fp32", "--temperature", "0", "--max-new-tokens", "10",
             "--ask", "你好", "--ask", "hello world", "--save", str(tmp_path / "t.md"))
    first, _, _ = reference(engine, [{"role": "user", "content": "你好"}], 10)
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "hello world"}]
    second, _, _ = reference(engine, history, 10)
    assert f"用户: 你好\ntiny-chat: {first}\n用户: hello world\ntiny-chat: {second}\n" in capsys.readouterr().out
    transcript = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert f"**用户:** hello world\n\n**tiny-chat:** {second}\n" in transcript


def test_demo_writes_a_transcript(engine, tiny_dir, tmp_path, monkeypatch):
    path = tmp_path / "demo.md"
    run_main(monkeypatch, "--model", tiny_dir, "--dtype", "fp32", "--temperature", "0", "--max-new-tokens", "8",
             "--demo", "--save", str(path))
    transcript = path.read_text(encoding="utf-8")
    for question in ChatGLM.DEMO_QUESTIONS:
        answer, _, _ = reference(engine, [{"role": "user", "content": question}], 8)  # each in a fresh chat
        assert f"**用户:** {question}\n\n**tiny-chat:** {answer}\n" in transcript
    assert "temperature 0.0" in transcript and transcript.startswith("# Task 0")


def test_user_turns_from_stdin(engine, tiny_dir, monkeypatch, capsys):
    """stdin is a pipe (not a terminal): every line is a user turn, and nothing waits for a person."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n\n/exit\nhello world\n"))
    run_main(monkeypatch, "--model", tiny_dir, "--dtype", "fp32", "--temperature", "0", "--max-new-tokens", "10")
    out = capsys.readouterr().out
    first, _, _ = reference(engine, [{"role": "user", "content": "你好"}], 10)
    assert f"用户: 你好\ntiny-chat: {first}\n" in out
    assert out.count("tiny-chat: ") == 1, "nothing is answered after /exit"


@pytest.mark.parametrize("has_bf16_units", [True, False])
def test_cpu_default_dtype_is_fp32_and_bf16_on_request(tiny_dir, monkeypatch, capsys, has_bf16_units):
    """--dtype auto on a CPU is fp32 even with bf16 units (greedy answers equal the fp32 reference); --dtype bf16
    loads bf16. The loaded precision is printed."""
    import course_utils
    monkeypatch.setattr(course_utils, "cpu_supports_bf16", lambda: has_bf16_units)
    for dtype, wanted in (("auto", torch.float32), ("bf16", torch.bfloat16)):
        run_main(monkeypatch, "--model", tiny_dir, "--device", "cpu", "--dtype", dtype, "--temperature", "0",
                 "--max-new-tokens", "4", "--ask", "你好")
        assert f"（cpu，{str(wanted).replace('torch.', '')}，" in capsys.readouterr().err
        model, _, _ = ChatGLM.load_model(tiny_dir, device="cpu", dtype=dtype)
        assert model.dtype == wanted


def test_empty_stdin_says_what_to_do(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    run_main(monkeypatch, "--model", tiny_dir)
    assert "--ask" in capsys.readouterr().err


def test_a_closed_stdout_ends_quietly(tiny_dir):
    """`python ChatGLM.py --ask ... | head`, where head has already left: no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, str(SCRIPT), "--model", tiny_dir, "--ask", "你好",
                                 "--max-new-tokens", "4"], stdout=write, stderr=subprocess.PIPE, text=True,
                                timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8"))
    finally:
        os.close(write)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------------ loading errors
def test_missing_weights_say_which_dir_to_create(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.time()
    with pytest.raises(ChatGLM.UserError) as error:  # the default model/chatglm2-6b-int4, offline
        ChatGLM.load_model(ChatGLM.DEFAULT_MODEL)
    assert "model/chatglm2-6b-int4" in str(error.value) and "THUDM/chatglm2-6b-int4" in str(error.value)
    assert time.time() - started < 10, "offline must fail fast, not retry the hub"
    with pytest.raises(ChatGLM.UserError, match="model/my-model"):
        ChatGLM.load_model("model/my-model")
    with pytest.raises(ChatGLM.UserError, match="someone/not-cached"):  # a hub id that is not in the cache
        ChatGLM.load_model("someone/not-cached")
    (tmp_path / "model" / "empty").mkdir(parents=True)
    with pytest.raises(ChatGLM.UserError, match="config.json"):
        ChatGLM.load_model("model/empty")


def test_chatglm_on_new_transformers_explains_the_fix(tmp_path):
    """ChatGLM-6B v1 (ChatGLM2 is converted instead, see test_chatglm2_convert.py), in a real process: one
    sentence naming the transformers range and the requirements file, no traceback."""
    model_dir = tmp_path / "model" / "chatglm-6b-int4"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "quantization_bit": 4, "position_encoding_2d": True,
        "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}}))
    result = run_script("--model", "model/chatglm-6b-int4", "--ask", "你好", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert ChatGLM.CHATGLM_RANGE in line and "requirements-chatglm.txt" in line
    requirements = (ROOT / "requirements-chatglm.txt").read_text()
    assert "transformers==4.41.2" in requirements


def test_port_problems_are_reported_before_loading(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for mode in ("--api", "--web"):
            with pytest.raises(ChatGLM.UserError, match="已被占用") as error:
                run_main(monkeypatch, mode, "--port", str(port), "--model", "model/not-loaded")
            assert f"127.0.0.1:{port}" in str(error.value) and "--port" in str(error.value)
    # 192.0.2.1 (TEST-NET) is no address of this machine: not "in use", but which --host to use
    with pytest.raises(ChatGLM.UserError, match="192.0.2.1:8000") as error:
        run_main(monkeypatch, "--api", "--host", "192.0.2.1", "--model", "model/not-loaded")
    assert "--host" in str(error.value) and "已被占用" not in str(error.value)
    with pytest.raises(ChatGLM.UserError, match="--port"):  # a usage error, not an OverflowError from bind()
        run_main(monkeypatch, "--web", "--port", "70000", "--model", "model/not-loaded")


# ------------------------------------------------------------------------------------------------ other model kinds
class FakeChatGLM:
    """Stands in for THUDM's remote code (which needs transformers<4.42): stream_chat yields the reply so far."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []
        self.config = type("Config", (), {"seq_length": 8192})()
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": 2})()

    def stream_chat(self, tokenizer, query, history, max_length, **kwargs):
        self.calls.append((query, list(history), max_length, kwargs))
        for end in range(1, len(self.answer) + 1):
            yield self.answer[:end], history + [(query, self.answer[:end])]


def test_chatglm_remote_code_goes_through_stream_chat(engine):
    fake = FakeChatGLM("你好，我是一个语言模型")
    glm = ChatGLM.ChatEngine(fake, engine.tokenizer, "chatglm2-6b-int4")
    assert glm.remote_code and glm.context_window == 8192
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    reply = glm.reply(messages, max_new_tokens=50, temperature=0, stop=["语言"])
    assert "".join(reply) == reply.text == "你好，我是一个" and reply.finish_reason == "stop"
    query, history, max_length, kwargs = fake.calls[0]
    assert query == "Q2" and history == [("S\n\nQ1", "A1")] and max_length == 8192
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 50
    reply = glm.reply(messages[:2], max_new_tokens=50, temperature=0.7, top_p=0.9)
    assert "".join(reply) == fake.answer
    assert fake.calls[1][0] == "S\n\nQ1" and fake.calls[1][3]["temperature"] == 0.7


def test_lora_adapter_dir_is_loaded_and_merged(engine, tiny_dir, tmp_path):
    """Task 8's output: a PEFT adapter directory whose adapter_config.json names the base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 init_lora_weights=False))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # make the adapter change the answers
    peft_model.save_pretrained(tmp_path / "adapter")
    engine.tokenizer.save_pretrained(tmp_path / "adapter")
    model, tokenizer, _ = ChatGLM.load_model(str(tmp_path / "adapter"), device="cpu", dtype="fp32")
    lora = ChatGLM.ChatEngine(model, tokenizer, "adapter", batching="generate")
    merged = ChatGLM.ChatEngine(peft_model.merge_and_unload(), engine.tokenizer, "merged", batching="generate")
    text = "".join(lora.reply(QUESTIONS[0], max_new_tokens=16, temperature=0))
    assert text == "".join(merged.reply(QUESTIONS[0], max_new_tokens=16, temperature=0))
    assert text != "".join(engine.reply(QUESTIONS[0], max_new_tokens=16, temperature=0))
    # --dtype bf16 (1.6-1.8x the tokens/s on a CPU with bf16 units): base and adapter in bf16, and it answers
    model, tokenizer, _ = ChatGLM.load_model(str(tmp_path / "adapter"), device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reply = ChatGLM.ChatEngine(model, tokenizer, "bf16", batching="generate").reply(
        QUESTIONS[0], max_new_tokens=16, temperature=0)
    assert "".join(reply) == reply.text and reply.completion_tokens > 0


def test_a_hub_id_is_converted_into_the_course_layout_not_the_hub_cache(tmp_path, monkeypatch):
    """--model THUDM/chatglm2-6b-int4: the download sits in the hub cache; its converted copy goes to
    model/chatglm2-6b-int4-glm (found there the next time), never inside the cache."""
    snapshot = tmp_path / "hub" / "models--THUDM--chatglm2-6b-int4" / "snapshots" / "abc"
    monkeypatch.setattr(ChatGLM, "local_or_hub", lambda path, hub_id, *a, **k: str(snapshot))
    source, wanted = ChatGLM.resolve_model("THUDM/chatglm2-6b-int4")
    assert source == str(snapshot) and wanted == "model/chatglm2-6b-int4"
    assert ChatGLM.convert_chatglm2.native_dir_for(wanted) == Path("model/chatglm2-6b-int4-glm")
