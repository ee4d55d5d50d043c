"""Task 0 · ChatGLM.py —— 和本地大模型聊天：终端、网页（Gradio）或 OpenAI 风格的 API。

任务：和一个语言模型聊天（默认 ChatGLM2-6B-int4；只有 CPU 时可用 chatglm-6b-int4；也可以是 Llama-2-7b-chat、
任何 🤗 对话模型，或 Task 8 训练出的模型），把有趣的回答分享出来。

    python ChatGLM.py                                   # 终端对话（默认模型 model/chatglm2-6b-int4）
    python ChatGLM.py --model model/chatgpt2-base       # 任何 🤗 模型目录或 hub id（含 Task 8 的 LoRA 目录）
    python ChatGLM.py --ask "你好" --ask "再说一遍"      # 不进入交互，问完就退出
    echo "你好" | python ChatGLM.py                     # stdin 不是终端时，每行是一轮用户输入
    python ChatGLM.py --demo                            # 问讲义里的三个问题，写出 Markdown 对话记录
    python ChatGLM.py --web [--share]                   # Gradio 网页（Colab 上加 --share）
    python ChatGLM.py --api [--api-key KEY]             # OpenAI 兼容接口 http://127.0.0.1:8000/v1
    python ChatGLM.py --convert SRC OUT                 # 把 THUDM 发布的 ChatGLM2 目录转成 transformers 原生格式

终端里的命令：/help /clear /exit /save FILE /set key=value；Ctrl-C 只打断当前回答。
ChatGLM2 第一次使用时自动转换为 transformers 自带的 glm 格式（convert_chatglm2.py），不运行 remote code；
只有 ChatGLM-6B 第一代还要旧版 transformers：pip install -r requirements-chatglm.txt（单独的环境）。
"""
import argparse
import copy
import errno
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from queue import Empty, Queue

import torch
import transformers
from packaging.version import Version
from transformers import (AutoModel, AutoModelForCausalLM, AutoTokenizer, StoppingCriteria,
                          StoppingCriteriaList)
from transformers.generation.streamers import BaseStreamer

import convert_chatglm2  # ChatGLM2 in THUDM's layout -> transformers' own glm model
from hub_utils import hub_reachable  # shared by every task script

# ---------------------------------------------------------------------------------------------------------------
# 0. Constants
# ---------------------------------------------------------------------------------------------------------------
DEFAULT_MODEL = "model/chatglm2-6b-int4"
# When model/<name> is missing we fall back to these hub ids (and say that we are downloading).
KNOWN_HUB_IDS = {
    "chatglm2-6b-int4": "THUDM/chatglm2-6b-int4",
    "chatglm2-6b": "THUDM/chatglm2-6b",
    "chatglm-6b-int4": "THUDM/chatglm-6b-int4",
    "chatglm-6b": "THUDM/chatglm-6b",
    "Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-chat-hf",
}
# ChatGLM-6B v1's modeling_chatglm.py (ChatGLM2 no longer needs it: see convert_chatglm2.py) is written
# against transformers 4.3x: from 4.42 on, its chat() fails
# ("too many values to unpack", then removed cache helpers, then no GenerationMixin in 5.x).
CHATGLM_TRANSFORMERS = (Version("4.30"), Version("4.42"))
CHATGLM_RANGE = ">=4.30,<4.42"
# transformers renamed from_pretrained(torch_dtype=) to dtype= in 4.56.
DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEMO_QUESTIONS = ["什么情况下商贩会售卖淹死的鱼？", "两杯50度的巧克力混合起来是多少度？", "如何向盲人推销VR眼镜？"]
HELP = """命令：
  /help             显示这段帮助
  /clear            清空对话历史（保留系统提示）
  /save FILE        保存对话记录（.json 存消息列表，其他后缀存 Markdown）
  /set key=value    修改参数：temperature, top_p, max_new_tokens, system（系统提示）
  /exit             退出（也可以 Ctrl-D）
  Ctrl-C            打断正在生成的回答，对话继续"""


class UserError(Exception):
    """A failure we foresaw: main() prints its one-sentence message instead of a stack trace."""


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------------------
# 1. Finding and loading the model
# ---------------------------------------------------------------------------------------------------------------
def resolve_model(name):
    """Returns (where to load from, local_files_only, the directory the student should create or None).

    Course layout first: a local directory. A missing `model/<name>` falls back to its known hub id;
    anything else that is not a local path is taken as a hub id ("gpt2", "Qwen/Qwen2.5-0.5B-Instruct")."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UserError(f"{path} 里没有 config.json（也不是 LoRA 目录），请放入完整的模型文件（save_pretrained 的输出）")
        return str(path), True, None
    looks_local = path.is_absolute() or name.startswith((".", "~")) or len(path.parts) > 2 or path.parts[0] == "model"
    if looks_local:
        hub_id = KNOWN_HUB_IDS.get(path.name)
        if hub_id is None:
            raise UserError(f"找不到模型目录 {path}：请创建它并放入模型文件，或用 --model 指向已有目录 / 🤗 hub id")
        wanted = str(path)
    else:
        hub_id, wanted = name, None
    if hub_reachable():
        print(f"本地没有 {wanted or hub_id}，正在从 🤗 hub 下载 {hub_id}（第一次会比较久）…", file=sys.stderr)
        return hub_id, False, wanted
    # No network: only the hub cache can help.
    from huggingface_hub import try_to_load_from_cache
    if not isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        raise offline_error(hub_id, wanted)
    return hub_id, True, wanted


def offline_error(hub_id, wanted):
    where = wanted or f"model/{hub_id.split('/')[-1]}"
    return UserError(f"没有网络，本地也没有 {where}：请在能联网的机器上运行 `hf download {hub_id} --local-dir {where}`"
                     f"（或 git clone https://huggingface.co/{hub_id}），再把目录拷到这里")


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("没有可用的 CUDA GPU：去掉 --device cuda 用 CPU，或在 Colab 上选 GPU 运行时")
    return name


def pick_dtype(name, device):
    if name not in ("auto", "nf4"):  # nf4: 4-bit weights, computing in the automatic dtype
        return DTYPES[name]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # half precision on a CPU is slow or unsupported for many ops


def read_config(source):
    path = Path(source) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def is_chatglm(name, config):
    return config.get("model_type") == "chatglm" if config else "chatglm" in str(name).lower()


def is_chatglm_v1(name, config):
    return convert_chatglm2.is_chatglm_v1(config) if config else "chatglm-6b" in str(name).lower()


def chatglm2_native(source, local_only, wanted):
    """ChatGLM2 in THUDM's layout -> its native `glm` copy beside it, converted on first use, then reused."""
    target = convert_chatglm2.native_dir_for(source, wanted)
    if target.is_dir():
        print(f"使用已转换的 {target}", file=sys.stderr)
        return str(target)
    if not Path(source).is_dir():  # a hub id: THUDM's files, but not their .py (we never run them)
        from huggingface_hub import snapshot_download
        source = snapshot_download(source, local_files_only=local_only,
                                   allow_patterns=["*.json", "*.model", "*.safetensors", "*.bin"])
    print(f"第一次使用：把 {source} 转换为 transformers 原生格式，存到 {target}（只做一次）", file=sys.stderr)
    return str(convert_chatglm2.convert(source, target))


def check_chatglm_transformers():
    low, high = CHATGLM_TRANSFORMERS
    have = Version(transformers.__version__)
    if not (low <= have < high):
        raise UserError(f"ChatGLM-6B 第一代的 remote code 需要 transformers{CHATGLM_RANGE}（当前是 {have}）："
                        f"请在单独的环境或 Colab 里运行 pip install -r requirements-chatglm.txt（其中是 transformers==4.41.2）")


def load_chatglm(source, local_only, device, dtype_name, config):
    """ChatGLM-6B v1: THUDM's own modeling code (trust_remote_code), used through its chat()/stream_chat()."""
    check_chatglm_transformers()
    quantized = bool(config.get("quantization_bit")) or "int4" in str(source).lower()
    if quantized and device == "cuda":
        try:  # the int4 CUDA kernels; this import itself fails where there is no CUDA driver
            import cpm_kernels  # noqa: F401
        except Exception as error:
            raise UserError(f"int4 模型要用 cpm_kernels 和 CUDA 驱动，但 import cpm_kernels 失败（{first_line(error)}）："
                            f"pip install -r requirements-chatglm.txt，并确认 nvidia-smi 能看到 GPU") from None
    if quantized and device == "cpu":
        if shutil.which("gcc") is None:
            raise UserError("没有 GPU：int4 模型在 CPU 上要用 gcc（带 OpenMP）现场编译内核，请先安装 gcc，"
                            "或在 Colab 上选 GPU 运行时，或改用 --model model/chatglm-6b-int4")
        print("提示：在 CPU 上运行 int4 模型很慢（ChatGLM2-6B-int4 在 CPU 上常编译失败，CPU 推荐 chatglm-6b-int4）。",
              file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True, local_files_only=local_only)
    model = AutoModel.from_pretrained(source, trust_remote_code=True, local_files_only=local_only)
    # The official demos: .half().cuda() on a GPU, .float() on a CPU (the int4 weights stay packed either way).
    model = model.to(DTYPES.get(dtype_name, torch.float16)).cuda() if device == "cuda" else model.float()
    return model.eval(), tokenizer


def load_peft(source, local_only, device, dtype, trust_remote_code):
    """A Task 8 LoRA directory: base model + adapter, merged so that generation runs at full speed."""
    from peft import AutoPeftModelForCausalLM, PeftConfig
    base = PeftConfig.from_pretrained(source).base_model_name_or_path
    if base and not Path(base).exists() and Path(base).parts[:1] == ("model",):
        raise UserError(f"LoRA 目录 {source} 的基座模型 {base} 不存在：请先准备好基座模型（Task 4/5 的 {base}）")
    kwargs = {DTYPE_KW: dtype, "local_files_only": local_only, "trust_remote_code": trust_remote_code}
    model = AutoPeftModelForCausalLM.from_pretrained(source, **kwargs).merge_and_unload()
    has_tokenizer = any((Path(source) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(source if has_tokenizer else base, local_files_only=local_only)
    return model.to(device).eval(), tokenizer


def load_model(name, device="auto", dtype="auto", trust_remote_code=False):
    """Returns (model, tokenizer, device). Every foreseeable failure becomes a UserError."""
    source, local_only, wanted = resolve_model(name)
    device = pick_device(device)
    config = read_config(source) if Path(source).is_dir() else {}
    try:
        plan = {}
        if is_chatglm(name, config) and not is_chatglm_v1(name, config):  # ChatGLM2: native, no remote code
            source, local_only = chatglm2_native(source, local_only, wanted), True
            plan, note = convert_chatglm2.loading_plan(source, device, dtype)  # fp16/bf16 if it fits, else NF4
            print(note, file=sys.stderr)
        if is_chatglm(name, config) and not plan:
            model, tokenizer = load_chatglm(source, local_only, device, dtype, config)
        elif (Path(source) / "adapter_config.json").exists():
            model, tokenizer = load_peft(source, local_only, device, pick_dtype(dtype, device), trust_remote_code)
        else:
            kwargs = {DTYPE_KW: pick_dtype(dtype, device), "local_files_only": local_only,
                      "trust_remote_code": trust_remote_code}
            if device == "cuda":
                kwargs["device_map"] = "auto"  # straight onto the GPU: Colab has less RAM than a 7B model in fp16
            if dtype == "nf4":
                kwargs.update(convert_chatglm2.nf4_kwargs(device, kwargs[DTYPE_KW]))
            kwargs.update(plan)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only,
                                                      trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            if "device_map" not in kwargs:
                model = model.to(device)
            model.eval()
    except UserError:
        raise
    except convert_chatglm2.ConversionError as error:
        raise UserError(str(error)) from None
    except torch.cuda.OutOfMemoryError:
        raise UserError("显存不够：换 int4 模型或更小的模型，或加 --device cpu") from None
    except ImportError as error:
        raise UserError(f"缺少依赖（{first_line(error)}）：pip install -r requirements.txt"
                        f"（ChatGLM-6B 第一代用 requirements-chatglm.txt）") from None
    except (OSError, ValueError) as error:
        if local_only and not Path(source).is_dir():
            raise offline_error(source, wanted) from None
        if "trust_remote_code" in str(error):
            raise UserError(f"{name} 带有自定义代码：确认可信后加 --trust-remote-code 再运行") from None
        raise UserError(f"加载 {source} 失败：{first_line(error)}") from None
    return model, tokenizer, device


def context_window(model, tokenizer):
    """How many tokens the model can see (prompt + reply), from its config."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


# ---------------------------------------------------------------------------------------------------------------
# 2. The chat engine: messages -> prompt -> streamed reply (shared by the terminal, the page and the API)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    max_new_tokens: int = 512
    temperature: float = 0.8  # 0 means greedy decoding
    top_p: float = 0.8
    system: str = ""


class PromptError(ValueError):
    """The conversation cannot be turned into a prompt: a 400 for the API, a one-line note in the terminal."""


class ContextTooLong(PromptError):
    pass


class StopOnEvent(StoppingCriteria):
    """Ends generate() between two tokens once the event is set (Ctrl-C, a stop string, a closed connection)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TokenStreamer(BaseStreamer):
    """Gets token ids from generate() (in the generation thread) and queues text pieces for the reader.

    Unlike TextIteratorStreamer it also keeps the ids (for usage counts) and sends every character as soon as it
    is complete: it decodes all new ids and sends what is new, holding back a trailing '\ufffd' (half of a Chinese
    character in a byte-level BPE). So the pieces add up to exactly tokenizer.decode(new ids)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0
        self.queue, self.prompt_seen, self.ended = Queue(), False, False

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._send(final=False)

    def _send(self, final):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.queue.put(text[self.sent:])
            self.sent = len(text)

    def end(self):
        if not self.ended:
            self.ended = True
            self._send(final=True)
            self.queue.put(None)


def message_text(content):
    """OpenAI and Gradio 6 may send content as a list of parts: [{"type": "text", "text": "..."}]."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


class Reply:
    """One streamed answer. Iterate it for text pieces; afterwards read .text, .finish_reason and the token counts.

    finish_reason: "stop" (end of turn or a stop string), "length" (max_new_tokens), "interrupted" (cancel())."""

    def __init__(self, engine, messages, prompt_ids, max_new_tokens, sampling, stop, extra):
        self.engine, self.messages, self.prompt_ids = engine, messages, prompt_ids
        self.max_new_tokens, self.sampling, self.stop, self.extra = max_new_tokens, sampling, stop or [], extra
        self.text, self.finish_reason, self.completion_tokens = "", None, 0
        self.prompt_tokens, self.dropped = len(prompt_ids), 0
        self._natural_finish = "stop"
        self._cancel = threading.Event()
        self._gen = None

    def __iter__(self):
        if self._gen is None:
            self._gen = self._run()
        return self._gen

    def cancel(self):
        self._cancel.set()

    def close(self):
        """Stop generating and free the model (safe to call at any time, from any thread)."""
        self._cancel.set()
        if self._gen is not None:
            try:
                self._gen.close()
            except ValueError:  # being iterated by another thread right now: the cancel event ends it
                pass

    # Stop strings: hold back the end of the text while it could be the start of a stop string,
    # so that no part of a stop string is ever sent.
    def _run(self):
        pending = ""
        try:
            for piece in self._pieces():
                pending += piece
                hits = [pending.find(s) for s in self.stop if s in pending]
                if hits:
                    pending = pending[:min(hits)]
                    self.finish_reason = "stop"
                    self._cancel.set()
                    break
                hold = max([k for s in self.stop for k in range(1, len(s)) if pending.endswith(s[:k])], default=0)
                ready, pending = pending[:len(pending) - hold], pending[len(pending) - hold:]
                if ready:
                    self.text += ready
                    yield ready
            if pending:
                self.text += pending
                yield pending
            if self.finish_reason is None:
                self.finish_reason = self._natural_finish
        except BaseException:  # Ctrl-C, or the reader went away (GeneratorExit)
            if self.finish_reason is None:
                self.finish_reason = "interrupted"
            raise
        finally:
            self._cancel.set()

    def _pieces(self):
        if self.engine.remote_code:
            yield from self._chatglm_pieces()
        else:
            yield from self._generate_pieces()

    def _generate_pieces(self):
        """model.generate() in a thread, its tokens arriving through TokenStreamer."""
        engine = self.engine
        streamer = TokenStreamer(engine.tokenizer)
        config = copy.deepcopy(engine.model.generation_config)
        config.max_new_tokens = self.max_new_tokens
        config.update(**self.sampling, **self.extra)
        if config.pad_token_id is None:
            pad = engine.tokenizer.pad_token_id
            config.pad_token_id = pad if pad is not None else engine.eos_ids[0]
        input_ids = torch.tensor([self.prompt_ids], device=engine.model.device)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                      streamer=streamer, stopping_criteria=StoppingCriteriaList([StopOnEvent(self._cancel)]))
        error = []

        def work():
            try:
                engine.model.generate(**kwargs)
            except BaseException as exc:  # re-raised in the reading thread
                error.append(exc)
            finally:
                streamer.end()
                engine.lock.release()  # released here, so an abandoned reader can never keep the model locked

        engine.lock.acquire()  # one generation at a time: every other request waits here, in order
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                try:
                    piece = streamer.queue.get(timeout=0.1)  # a timeout keeps Ctrl-C responsive everywhere
                except Empty:
                    continue
                if piece is None:
                    break
                yield piece
        finally:
            cancelled = self._cancel.is_set()
            self._cancel.set()
            thread.join()
            self.completion_tokens = len(streamer.ids)
            ended_on_eos = bool(streamer.ids) and streamer.ids[-1] in engine.eos_ids
            if cancelled and not ended_on_eos:
                self._natural_finish = "interrupted"
            else:
                self._natural_finish = "stop" if ended_on_eos or len(streamer.ids) < self.max_new_tokens else "length"
        if error:
            raise error[0]

    def _chatglm_pieces(self):
        """ChatGLM's remote code streams the whole reply so far each time; we send what is new."""
        engine, history, query = self.engine, [], ""
        turns = [m for m in self.messages if m["role"] != "system"]
        system = "".join(m["content"] for m in self.messages if m["role"] == "system")
        for message in turns:  # ChatGLM keeps history as (question, answer) pairs and has no system role
            if message["role"] == "user":
                query = message["content"]
            else:
                history.append((query, message["content"]))
                query = ""
        if system:
            if history:
                history[0] = (f"{system}\n\n{history[0][0]}", history[0][1])
            else:
                query = f"{system}\n\n{query}"
        greedy = self.sampling["do_sample"] is False
        sent = ""
        with engine.lock:
            for response, _ in engine.model.stream_chat(
                    engine.tokenizer, query, history, max_length=engine.context_window,
                    max_new_tokens=self.max_new_tokens, do_sample=not greedy,
                    top_p=1.0 if greedy else self.sampling["top_p"],
                    temperature=1.0 if greedy else self.sampling["temperature"]):
                if self._cancel.is_set():
                    break
                if response.startswith(sent) and len(response) > len(sent):
                    yield response[len(sent):]
                    sent = response
        self.completion_tokens = len(engine.tokenizer.encode(sent, add_special_tokens=False))
        if self._cancel.is_set():
            self._natural_finish = "interrupted"
        else:
            self._natural_finish = "length" if self.completion_tokens >= self.max_new_tokens else "stop"


class ChatEngine:
    """One model, one tokenizer, one lock: the terminal, the page and the API all talk through this."""

    def __init__(self, model, tokenizer, name="model"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lock = threading.Lock()
        self.context_window = context_window(model, tokenizer)
        self.remote_code = hasattr(model, "stream_chat")  # THUDM's ChatGLM models bring their own chat loop
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = [i for i in eos + [tokenizer.eos_token_id] if i is not None] or [0]
        # Without a chat template we fall back to a plain "User:/Assistant:" transcript, ended by this stop string.
        self.default_stop = [] if self.has_template or self.remote_code else ["\nUser:"]

    def render(self, messages):
        """The prompt text the model sees: the tokenizer's own chat template when it has one."""
        if self.has_template:
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as error:  # the template's own raise_exception(), e.g. "roles must alternate"
                if len(messages) > 1 and messages[0]["role"] == "system":  # some templates reject a system turn
                    merged = [dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])]
                    return self.render(merged + messages[2:])
                raise PromptError(f"the chat template rejected these messages: {first_line(error)}") from None
        lines = [messages[0]["content"] + "\n"] if messages and messages[0]["role"] == "system" else []
        lines += [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                  for m in messages if m["role"] != "system"]
        return "\n".join(lines) + "\nAssistant:"

    def prompt_ids(self, messages):
        return self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]

    def fit(self, messages, max_new_tokens, trim=True):
        """Drops the oldest user/assistant pairs (never the system prompt, never the last question) until
        prompt + max_new_tokens fits the context window; trim=False only checks that the prompt fits.
        Returns (messages, prompt ids, max_new_tokens, number of pairs dropped)."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = list(messages[len(system):])
        dropped = 0
        ids = self.prompt_ids(system + rest)
        while trim and len(ids) + max_new_tokens > self.context_window and len(rest) > 1:
            rest = rest[2:]  # one (user, assistant) pair
            dropped += 1
            ids = self.prompt_ids(system + rest)
        if len(ids) >= self.context_window:
            raise ContextTooLong(f"这段输入有 {len(ids)} 个 token，超过了模型的上下文长度 {self.context_window}")
        return system + rest, ids, min(max_new_tokens, self.context_window - len(ids)), dropped

    def reply(self, messages, max_new_tokens=512, temperature=0.8, top_p=0.8, stop=None, trim=True, **extra):
        """Prepares one reply (nothing runs until it is iterated). trim=False (the API) refuses an overlong
        conversation instead of forgetting its beginning. extra goes to generate() (the benchmark's min_new_tokens)."""
        messages = [{"role": m["role"], "content": message_text(m["content"])} for m in messages]
        messages, ids, max_new_tokens, dropped = self.fit(messages, max_new_tokens, trim)
        if temperature > 0 and top_p > 0:
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p)
        else:  # greedy; neutral values keep generate() from warning about unused sampling settings
            sampling = dict(do_sample=False, temperature=1.0, top_p=1.0)
        reply = Reply(self, messages, ids, max_new_tokens, sampling, list(stop or []) + self.default_stop, extra)
        reply.dropped = dropped
        return reply


# ---------------------------------------------------------------------------------------------------------------
# 3. Terminal
# ---------------------------------------------------------------------------------------------------------------
class TerminalChat:
    """The conversation in a terminal: history, commands, streaming output and Markdown transcripts."""

    def __init__(self, engine, settings, out=None):
        self.engine, self.settings = engine, settings
        self.out = out or sys.stdout
        self.history = []  # every turn, for /save; the prompt only gets what fits the context window

    def messages(self):
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return system + self.history

    def ask(self, text):
        """Streams one answer to self.out; Ctrl-C ends the answer but not the conversation."""
        self.history.append({"role": "user", "content": text})
        s = self.settings
        try:
            reply = self.engine.reply(self.messages(), s.max_new_tokens, s.temperature, s.top_p)
        except PromptError as error:
            self.history.pop()
            self.write(f"（{error}，请缩短后再试）\n")
            return None
        try:  # Ctrl-C may come at any moment from here on
            if reply.dropped:
                self.write(f"（上下文已满，最早的 {reply.dropped} 轮对话不再给模型看）\n")
            self.write(f"{self.engine.name}> ")
            for piece in reply:
                self.write(piece)
        except KeyboardInterrupt:
            reply.cancel()
            self.write(" [已中断]")
        except torch.cuda.OutOfMemoryError:
            self.write(" [显存不够：/clear 清空历史，或 /set max_new_tokens=... 调小再试]")
        finally:
            reply.close()
        self.write("\n")
        self.history.append({"role": "assistant", "content": reply.text})
        return reply

    def write(self, text):
        self.out.write(text)
        self.out.flush()

    def handle(self, line):
        """One line of input: a command or a question. Returns False when the user wants to leave."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.ask(line)
            return True
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/help":
            self.write(HELP + "\n")
        elif command == "/clear":
            self.history.clear()
            self.write("（对话已清空）\n")
        elif command == "/save":
            if not argument:
                self.write("用法：/save FILE（例如 /save chat.md）\n")
            else:
                try:
                    self.write(f"（已保存到 {self.save(argument)}）\n")
                except UserError as error:
                    self.write(f"{error}\n")
        elif command == "/set":
            self.write(self.set(argument) + "\n")
        else:
            self.write(f"不认识的命令 {command}，输入 /help 查看命令\n")
        return True

    def set(self, assignment):
        key, sep, value = assignment.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not sep or not key:
            return "用法：/set key=value，例如 /set temperature=0.5；当前：" + json.dumps(asdict(self.settings), ensure_ascii=False)
        try:
            if key == "system":
                self.settings.system = value
            elif key == "temperature" and float(value) >= 0:
                self.settings.temperature = float(value)
            elif key == "top_p" and 0 < float(value) <= 1:
                self.settings.top_p = float(value)
            elif key == "max_new_tokens" and int(value) >= 1:
                self.settings.max_new_tokens = int(value)
            else:
                raise ValueError
        except ValueError:
            return (f"无法设置 {key}={value}：可设 temperature（≥0）、top_p（0~1]、max_new_tokens（≥1 的整数）、system")
        return f"（{key} = {value}）"

    def save(self, filename, title=None):
        """.json: the message list; anything else: the Markdown transcript."""
        path = Path(filename)
        text = (json.dumps(self.messages(), ensure_ascii=False, indent=2) if path.suffix == ".json"
                else self.transcript(title))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as error:
            raise UserError(f"无法写入 {path}（{error.strerror or error}）：换一个文件名或目录") from None
        return path

    def transcript(self, title=None):
        """A Markdown record a student can hand in."""
        s = self.settings
        lines = [f"# {title or '与 ' + self.engine.name + ' 的对话'}", "",
                 f"- 模型：`{self.engine.name}`", f"- 时间：{datetime.now():%Y-%m-%d %H:%M}",
                 f"- 参数：temperature={s.temperature}, top_p={s.top_p}, max_new_tokens={s.max_new_tokens}"]
        if s.system:
            lines.append(f"- 系统提示：{s.system}")
        number = 0
        for message in self.history:
            if message["role"] == "user":
                number += 1
                lines += ["", f"## 问题 {number}", "", f"**用户**：{message['content']}"]
            else:
                lines += ["", f"**{self.engine.name}**：", "", message["content"]]
        return "\n".join(lines) + "\n"


def run_demo(chat, path):
    """The handout's three questions, each in a fresh conversation, written to a Markdown transcript."""
    turns = []
    for question in DEMO_QUESTIONS:
        chat.history.clear()
        chat.write(f"用户> {question}\n")
        chat.ask(question)
        turns += chat.history
    chat.history = turns
    chat.write(f"（对话记录已写入 {chat.save(path, 'Task 0：和大模型聊天')}）\n")


def run_terminal(chat, args):
    if args.demo:
        run_demo(chat, args.save or "ChatGLM_demo.md")
        return
    if args.ask:  # non-interactive: ask, answer, leave
        for question in args.ask:
            chat.write(f"用户> {question}\n")
            if not chat.handle(question):
                break
    elif sys.stdin.isatty() or "ipykernel" in sys.modules:  # a person is typing (a notebook gives a text box)
        try:
            import readline  # noqa: F401  (arrow keys and line editing where available)
        except ImportError:
            pass
        chat.write(f"和 {chat.engine.name} 聊天吧。输入 /help 查看命令，/exit 退出，Ctrl-C 打断回答。\n")
        while True:
            try:
                line = input("\n用户> ")
            except (EOFError, KeyboardInterrupt):
                chat.write("\n再见！\n")
                break
            if not chat.handle(line):
                break
    else:  # stdin is a pipe or a file: each line is one user turn, never a prompt that waits
        lines = 0
        for line in sys.stdin:
            lines += 1
            if line.strip():
                chat.write(f"用户> {line.strip()}\n")
            if not chat.handle(line):
                break
        if not lines:
            print("提示：stdin 不是终端，也没有输入，所以没有对话：请在终端里运行，或用 --ask TEXT / --demo",
                  file=sys.stderr)
    if args.save:
        chat.write(f"（对话记录已写入 {chat.save(args.save)}）\n")


# ---------------------------------------------------------------------------------------------------------------
# 4. Web page (Gradio)
# ---------------------------------------------------------------------------------------------------------------
LATEX_DELIMITERS = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
                    {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]


def build_web_app(engine, settings):
    import inspect

    import gradio as gr

    chatbot_kwargs = {}
    if "type" in inspect.signature(gr.Chatbot.__init__).parameters:  # Gradio 5 needs the messages format asked for
        chatbot_kwargs["type"] = "messages"

    def add_user_turn(text, history):
        if not text.strip():
            return text, history
        return "", history + [{"role": "user", "content": text}]

    def stream_answer(history, system, temperature, top_p, max_new_tokens):
        if not history or history[-1]["role"] != "user":
            yield history
            return
        messages = [{"role": m["role"], "content": message_text(m["content"])} for m in history]
        if system.strip():
            messages.insert(0, {"role": "system", "content": system.strip()})
        try:
            reply = engine.reply(messages, int(max_new_tokens), float(temperature), float(top_p))
        except PromptError as error:
            yield history + [{"role": "assistant", "content": f"（{error}）"}]
            return
        text = ""
        try:
            for piece in reply:
                text += piece
                yield history + [{"role": "assistant", "content": text}]
        finally:  # the page was closed or the user pressed stop: end the generation too
            reply.close()
        yield history + [{"role": "assistant", "content": text}]

    with gr.Blocks(title=f"Chat · {engine.name}") as demo:
        gr.Markdown(f"## 💬 和 {engine.name} 聊天\n支持 Markdown 和 LaTeX（`$x^2$`、`$$\\int$$`）。")
        chatbot = gr.Chatbot(elem_id="chatbot", height=480, latex_delimiters=LATEX_DELIMITERS, **chatbot_kwargs)
        with gr.Row():
            message = gr.Textbox(elem_id="message", placeholder="输入消息，回车发送", show_label=False, scale=8)
            send = gr.Button("发送", elem_id="send", variant="primary", scale=1)
            clear = gr.Button("清空", elem_id="clear", scale=1)
        with gr.Row():
            temperature = gr.Slider(0, 2, value=settings.temperature, step=0.05, label="temperature（0 = 贪心）")
            top_p = gr.Slider(0.05, 1, value=settings.top_p, step=0.05, label="top_p")
            max_new_tokens = gr.Slider(1, max(1, min(4096, engine.context_window - 1)), step=1,
                                       value=min(settings.max_new_tokens, engine.context_window - 1),
                                       label="max_new_tokens")
        system = gr.Textbox(value=settings.system, label="系统提示（可选）")
        inputs = [chatbot, system, temperature, top_p, max_new_tokens]
        for event in (message.submit, send.click):
            event(add_user_turn, [message, chatbot], [message, chatbot], queue=False).then(
                stream_answer, inputs, chatbot)
        clear.click(lambda: [], None, chatbot, queue=False)
    return demo


# ---------------------------------------------------------------------------------------------------------------
# 5. OpenAI-compatible API (FastAPI)
# ---------------------------------------------------------------------------------------------------------------
class BadRequest(ValueError):
    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_chat_request(body, settings):
    """Checks a /v1/chat/completions body like OpenAI does; returns the arguments for ChatEngine.reply()."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", f"messages[{i}]")
        role = {"developer": "system"}.get(message.get("role"), message.get("role"))
        if role not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}",
                             f"messages[{i}].role")
        content = message.get("content")
        ok_parts = isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                     for p in content)
        if not (isinstance(content, str) or ok_parts or (content is None and role == "assistant")):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                             f"messages[{i}].content")
        clean.append({"role": role, "content": message_text(content)})
    args = {"messages": clean, "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature, "top_p": settings.top_p, "stop": []}
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = body.get(key)
        if value is not None:
            if not is_number(value) or not low <= value <= high:
                raise BadRequest(f"'{key}' must be a number between {low} and {high}", key)
            args[key] = float(value)
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadRequest(f"'{key}' must be a positive integer", key)
            args["max_new_tokens"] = value
    if body.get("n") not in (None, 1):
        raise BadRequest("only n=1 is supported", "n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
        args["stop"] = stop
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return args, bool(body.get("stream")), bool(options.get("include_usage"))


def build_api_app(engine, settings, model_id, api_key=None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

    app = FastAPI(title=f"OpenAI-compatible API · {model_id}")
    created = int(time.time())

    def error(status, message, param=None, code=None, kind="invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    def unauthorized(request):
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return error(401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY').",
                         code="invalid_api_key")
        return None

    @app.get("/v1/models")
    async def list_models(request: Request):
        if denied := unauthorized(request):
            return denied
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if denied := unauthorized(request):
            return denied
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not valid JSON")
        try:
            args, stream, include_usage = parse_chat_request(body, settings)
            reply = engine.reply(**args, trim=False)  # an API client sends the whole conversation it wants
        except BadRequest as bad:
            return error(400, str(bad), bad.param)
        except PromptError as bad:
            code = "context_length_exceeded" if isinstance(bad, ContextTooLong) else None
            return error(400, str(bad), "messages", code)
        ident, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage():
            return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens}

        if not stream:
            try:
                text = await run_in_threadpool(lambda: "".join(reply))  # waits its turn for the model
            except Exception as failure:
                return error(500, f"generation failed: {first_line(failure)}", kind="server_error")
            finally:
                reply.close()
            return {"id": ident, "object": "chat.completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reply.finish_reason, "logprobs": None}],
                    "usage": usage()}

        def chunk(delta, finish_reason=None, **more):
            data = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
            data.update(more)
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():  # Server-Sent Events, as OpenAI streams them
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece in iterate_in_threadpool(reply):
                    yield chunk({"content": piece})
                yield chunk({}, reply.finish_reason)
                if include_usage:
                    yield chunk({}, choices=[], usage=usage())  # OpenAI's usage chunk has no choices
                yield "data: [DONE]\n\n"
            except Exception as failure:
                payload = {"error": {"message": f"generation failed: {first_line(failure)}", "type": "server_error"}}
                yield f"data: {json.dumps(payload)}\n\n"
            finally:  # also runs when the client goes away mid-answer
                reply.close()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


# ---------------------------------------------------------------------------------------------------------------
# 6. main
# ---------------------------------------------------------------------------------------------------------------
def check_port(host, port):
    """Fails before the model is loaded (minutes) when the server could not listen on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except socket.gaierror:
            raise UserError(f"--host {host} 不是本机的地址：用 127.0.0.1（只有本机能访问）或 0.0.0.0（局域网也能访问）") from None
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"端口 {host}:{port} 已被占用：用 --port 换一个，或先关掉占用它的程序") from None
            raise UserError(f"无法在 {host}:{port} 上监听（{error.strerror}）：--host 用 127.0.0.1 或 0.0.0.0，"
                            f"--port 用 1024 以上的端口") from None


def parse_args():
    p = argparse.ArgumentParser(description="Task 0：在终端、网页或 OpenAI 风格的 API 里和本地模型聊天")
    p.add_argument("--model", default=DEFAULT_MODEL, help="模型目录或 🤗 hub id（默认 %(default)s）")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES, "nf4"], help="nf4：bitsandbytes 4-bit")
    p.add_argument("--trust-remote-code", action="store_true", help="允许模型自带的代码（ChatGLM-6B 第一代会自动打开）")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.8, help="0 表示贪心解码")
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--system", default="", help="系统提示")
    p.add_argument("--ask", action="append", default=[], metavar="TEXT", help="问一句就退出（可重复）")
    p.add_argument("--demo", action="store_true", help="问讲义的三个问题并写出 Markdown 记录")
    p.add_argument("--save", metavar="FILE", help="结束时把对话记录写到 FILE（--demo 默认 ChatGLM_demo.md）")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--web", action="store_true", help="启动 Gradio 网页")
    mode.add_argument("--api", action="store_true", help="启动 OpenAI 兼容接口")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="默认网页 7860，API 8000")
    p.add_argument("--share", action="store_true", help="网页：生成公网链接（Colab 上需要）")
    p.add_argument("--api-key", default=None, help="API：要求 Authorization: Bearer KEY")
    p.add_argument("--convert", nargs=2, metavar=("SRC", "OUT"), help="把 THUDM 的 ChatGLM2 目录转成原生 glm 目录后退出")
    args, unknown = p.parse_known_args()  # a notebook kernel passes its own arguments: ignore them
    if unknown and "ipykernel" not in sys.modules:
        print(f"提示：忽略不认识的参数 {' '.join(unknown)}（python ChatGLM.py --help 查看全部参数）", file=sys.stderr)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("需要 --max-new-tokens ≥ 1、--temperature ≥ 0、0 < --top-p ≤ 1")
    if args.port is not None and not 0 < args.port < 65536:
        p.error("--port 要在 1 到 65535 之间")
    return args


def main():
    args = parse_args()
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a console that cannot show Chinese gets '?', not a crash
    if args.convert:
        try:
            convert_chatglm2.convert(*args.convert)
        except convert_chatglm2.ConversionError as error:
            raise UserError(str(error)) from None
        return
    port = args.port or (8000 if args.api else 7860)
    if args.web or args.api:
        check_port(args.host, port)
    settings = Settings(args.max_new_tokens, args.temperature, args.top_p, args.system)
    print(f"正在加载 {args.model} …", file=sys.stderr)
    model, tokenizer, device = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    name = Path(args.model.rstrip("/")).name
    engine = ChatEngine(model, tokenizer, name)
    print(f"已加载 {name}（{device}，上下文 {engine.context_window} tokens）", file=sys.stderr)
    if args.web:
        if "COLAB_RELEASE_TAG" in os.environ and not args.share:
            print("提示：在 Colab 上请加 --share，才能在浏览器里打开网页。", file=sys.stderr)
        build_web_app(engine, settings).queue().launch(server_name=args.host, server_port=port, share=args.share)
    elif args.api:
        import uvicorn
        print(f"OpenAI 兼容接口：http://{args.host}:{port}/v1  （model = {name!r}）", file=sys.stderr)
        uvicorn.run(build_api_app(engine, settings, name, args.api_key), host=args.host, port=port)
    else:
        run_terminal(TerminalChat(engine, settings), args)


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()
    except UserError as failure:
        print(f"错误：{failure}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C while loading the model or outside a reply
        print("\n（已中断）", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python ChatGLM.py --ask ... | head`: the reader left; leave quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush cannot fail
        sys.exit(1)
