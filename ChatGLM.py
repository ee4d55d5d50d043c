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
对话引擎在 chat_engine.py（Task 8 的 ChatGPT2-base.py 也用它）：同时来的请求一起批量生成。
一个问题的路径 the path of a question: Chat.ask → ChatEngine.reply → Paged.submit / Batched.run → model.generate
ChatGLM2 第一次使用时自动转换为 transformers 自带的 glm 格式（convert_chatglm2.py），不运行 remote code；
只有 ChatGLM-6B 第一代还要旧版 transformers：pip install -r requirements-chatglm.txt（单独的环境）。
"""
import asyncio
import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import transformers
from packaging.version import Version
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import convert_chatglm2  # ChatGLM2 in THUDM's layout -> transformers' own glm model
from chat_engine import Chat, ChatEngine, ContextTooLong, Options, PromptError, first_line, message_text, run_terminal
from course_utils import (
    DTYPE_CHOICES,
    MODEL_FILES,
    ArgumentParser,
    UserError,
    hub_reachable,
    local_or_hub,
    parse_args,
    pick_device,
    pick_dtype,
    run_main,
    script_dir,
    torch_dtype,
)

# ---------------------------------------------------------------------------------------------------------------
# 0. Constants
# ---------------------------------------------------------------------------------------------------------------
HERE = script_dir(globals())
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
OLD_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # earlier spellings, still accepted
DEMO_QUESTIONS = ["什么情况下商贩会售卖淹死的鱼？", "两杯50度的巧克力混合起来是多少度？", "如何向盲人推销VR眼镜？"]
# ---------------------------------------------------------------------------------------------------------------
# 1. Finding and loading the model
# ---------------------------------------------------------------------------------------------------------------
def resolve_model(name):
    """Returns (a local directory with the model, the course directory model/<name> it stands for).

    Course layout first: a local directory. A missing `model/<name>` falls back to its known hub id; anything
    else that is not a local path is taken as a hub id ("gpt2", "Qwen/Qwen2.5-0.5B-Instruct"): the hub cache, else
    a download, else one sentence that names the directory to create."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UserError(f"{path} 里没有 config.json（也不是 LoRA 目录），"
                            f"请放入完整的模型文件（save_pretrained 的输出）")
        return str(path), str(path)
    looks_local = path.is_absolute() or name.startswith((".", "~")) or len(path.parts) > 2 or path.parts[0] == "model"
    if looks_local:
        hub_id = KNOWN_HUB_IDS.get(path.name)
        if hub_id is None:
            raise UserError(f"找不到模型目录 {path}：请创建它并放入模型文件，或用 --model 指向已有目录 / 🤗 hub id")
        wanted = str(path)
    else:  # a hub id; a ChatGLM2 among them is converted into model/<name>-glm, as for the course layout
        hub_id, wanted = name, str(Path("model") / name.split("/")[-1])
    # *.py: ChatGLM-6B v1's own modeling code (run only with trust_remote_code); *.tiktoken: some chat tokenizers
    return local_or_hub(wanted or hub_id, hub_id, HERE, patterns=[*MODEL_FILES, "*.py", "*.tiktoken"]), wanted


def read_config(source):
    path = Path(source) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def is_chatglm(name, config):
    return config.get("model_type") == "chatglm" if config else "chatglm" in str(name).lower()


def is_chatglm_v1(name, config):
    return convert_chatglm2.is_chatglm_v1(config) if config else "chatglm-6b" in str(name).lower()


def chatglm2_native(source, wanted):
    """ChatGLM2 in THUDM's layout -> its native `glm` copy beside it, converted on first use, then reused."""
    target = convert_chatglm2.native_dir_for(wanted)
    if target.is_dir():
        print(f"使用已转换的 {target}", file=sys.stderr)
        return str(target)
    print(f"第一次使用：把 {source} 转换为 transformers 原生格式，存到 {target}（只做一次）", file=sys.stderr)
    return str(convert_chatglm2.convert(source, target))


def check_chatglm_transformers():
    low, high = CHATGLM_TRANSFORMERS
    have = Version(transformers.__version__)
    if not (low <= have < high):
        raise UserError(f"ChatGLM-6B 第一代的 remote code 需要 transformers{CHATGLM_RANGE}（当前是 {have}）："
                        f"请在单独的环境或 Colab 里运行 pip install -r requirements-chatglm.txt"
                        f"（其中是 transformers==4.41.2）")


def load_chatglm(source, device, dtype_name, config):
    """ChatGLM-6B v1: THUDM's own modeling code (trust_remote_code), used through its chat()/stream_chat()."""
    check_chatglm_transformers()
    quantized = bool(config.get("quantization_bit")) or "int4" in str(source).lower()
    if quantized and device == "cuda":
        try:  # the int4 CUDA kernels; this import itself fails where there is no CUDA driver
            import cpm_kernels  # noqa: F401
        except Exception as error:
            raise UserError(f"int4 模型要用 cpm_kernels 和 CUDA 驱动，"
                            f"但 import cpm_kernels 失败（{first_line(error)}）："
                            f"pip install -r requirements-chatglm.txt，并确认 nvidia-smi 能看到 GPU") from None
    if quantized and device == "cpu":
        if shutil.which("gcc") is None:
            raise UserError("没有 GPU：int4 模型在 CPU 上要用 gcc（带 OpenMP）现场编译内核，请先安装 gcc，"
                            "或在 Colab 上选 GPU 运行时，或改用 --model model/chatglm-6b-int4")
        print("提示：在 CPU 上运行 int4 模型很慢（ChatGLM2-6B-int4 在 CPU 上常编译失败，CPU 推荐 chatglm-6b-int4）。",
              file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True, local_files_only=True)
    model = AutoModel.from_pretrained(source, trust_remote_code=True, local_files_only=True)
    # The official demos: .half().cuda() on a GPU, .float() on a CPU (the int4 weights stay packed either way).
    half = torch_dtype(dtype_name) if dtype_name != "auto" else torch.float16
    model = model.to(half).cuda() if device == "cuda" else model.float()
    return model.eval(), tokenizer


def load_peft(source, device, dtype, trust_remote_code):
    """A Task 8 LoRA directory: base model + adapter, merged so that generation runs at full speed."""
    from peft import AutoPeftModelForCausalLM, PeftConfig
    base = PeftConfig.from_pretrained(source).base_model_name_or_path
    if base and not Path(base).exists() and Path(base).parts[:1] == ("model",):
        raise UserError(f"LoRA 目录 {source} 的基座模型 {base} 不存在：请先准备好基座模型（Task 4/5 的 {base}）")
    # a base given as a hub id: from the hub cache, at once, when there is no network (a local base needs no probe)
    offline = not Path(base).exists() and not hub_reachable()
    kwargs = {DTYPE_KW: dtype, "trust_remote_code": trust_remote_code, "local_files_only": offline}
    model = AutoPeftModelForCausalLM.from_pretrained(source, **kwargs).merge_and_unload()
    has_tokenizer = any((Path(source) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(source if has_tokenizer else base, local_files_only=offline)
    return model.to(device).eval(), tokenizer


def load_causal_lm(source, device, dtype, quant, trust_remote_code, plan):
    """Any 🤗 causal LM (and a converted ChatGLM2, with the from_pretrained arguments its loading plan chose)."""
    kwargs = {DTYPE_KW: dtype, "local_files_only": True, "trust_remote_code": trust_remote_code}
    if device == "cuda":
        kwargs["device_map"] = "auto"  # straight onto the GPU: Colab has less RAM than a 7B model in fp16
    if quant == "4bit":
        kwargs.update(convert_chatglm2.nf4_kwargs(device, dtype))
    kwargs.update(plan)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval(), tokenizer


def load_model(name, device="auto", dtype="auto", trust_remote_code=False, quant="auto"):
    """Returns (model, tokenizer, device). dtype: auto/fp32/bf16/fp16; quant: auto/none/4bit (NF4).
    Every foreseeable failure becomes a UserError."""
    source, wanted = resolve_model(name)
    device, dtype = pick_device(device), canonical_dtype(dtype)
    config = read_config(source)
    try:
        plan = {}
        if is_chatglm(name, config) and not is_chatglm_v1(name, config):  # ChatGLM2: native, no remote code
            source = chatglm2_native(source, wanted)
        if (Path(source) / convert_chatglm2.FORMAT_NOTE).is_file():  # a converted ChatGLM2, also when given directly
            plan, note = convert_chatglm2.loading_plan(source, device, dtype, quant)  # half if it fits, else NF4
            print(note, file=sys.stderr)
        # on a CPU the default is fp32: greedy answers then equal the fp32 reference. --dtype bf16 is 1.6-1.8x the
        # tokens/s on a CPU with bf16 units (decoding reads every weight once per step: half the bytes;
        # bench/bench_chat.py), but answers flip where two tokens are close: SmolLM2 starts "The capital..." or
        # "L'Étoile..." (0.08 apart in fp32). Without bf16 units bf16 is emulated and slower than fp32.
        torch_type = torch_dtype(pick_dtype(dtype, device, cpu_bf16=False))
        if is_chatglm(name, config) and not plan:
            return (*load_chatglm(source, device, dtype, config), device)
        if (Path(source) / "adapter_config.json").exists():
            return (*load_peft(source, device, torch_type, trust_remote_code), device)
        return (*load_causal_lm(source, device, torch_type, quant, trust_remote_code, plan), device)
    except torch.cuda.OutOfMemoryError:
        raise UserError("显存不够：换 int4 模型或更小的模型，或加 --device cpu") from None
    except ImportError as error:
        raise UserError(f"缺少依赖（{first_line(error)}）：pip install -r requirements.txt"
                        f"（ChatGLM-6B 第一代用 requirements-chatglm.txt）") from None
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):
            raise UserError(f"{name} 带有自定义代码：确认可信后加 --trust-remote-code 再运行") from None
        raise UserError(f"加载 {source} 失败：{first_line(error)}") from None


# ---------------------------------------------------------------------------------------------------------------
# 2. Terminal: the engine's Chat (history, /commands, Ctrl-C, transcript), plus Task 0's demo
# ---------------------------------------------------------------------------------------------------------------
def run_demo(chat, path):
    """The handout's three questions, each in a fresh conversation, written to one Markdown transcript."""
    for question in DEMO_QUESTIONS:
        chat.history.clear()
        chat.write(f"{chat.user_name}: {question}\n")
        chat.ask(question)
    chat.write(f"（对话记录已写入 {chat.save(path, 'Task 0：和大模型聊天')}）\n")


def terminal(chat, args):
    if args.demo:
        return run_demo(chat, args.save or "ChatGLM_demo.md")
    if not args.ask and sys.stdin.isatty():
        chat.write(f"和 {chat.engine.name} 聊天吧。输入 /help 查看命令，/exit 退出，Ctrl-C 打断回答。\n")
    if not run_terminal(chat, args.ask) and not args.ask and not sys.stdin.isatty():
        print("提示：stdin 不是终端，也没有输入，所以没有对话：请在终端里运行，或用 --ask TEXT / --demo",
              file=sys.stderr)
    if args.save:
        chat.write(f"（对话记录已写入 {chat.save(args.save)}）\n")


# ---------------------------------------------------------------------------------------------------------------
# 3. Web page (Gradio): every open page is one more concurrent request to the engine
# ---------------------------------------------------------------------------------------------------------------
LATEX_DELIMITERS = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
                    {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]


def build_web_app(engine, options, system=""):
    import inspect
    from dataclasses import replace

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
        asked = replace(options, temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens))
        try:
            reply = engine.reply(messages, asked)
        except PromptError as error:
            yield history + [{"role": "assistant", "content": f"（{error}）"}]
            return
        try:
            for _ in reply:
                yield history + [{"role": "assistant", "content": reply.text}]
        finally:  # the page was closed or the user pressed stop: end the generation too
            reply.cancel()
        yield history + [{"role": "assistant", "content": reply.text}]

    with gr.Blocks(title=f"Chat · {engine.name}") as demo:
        gr.Markdown(f"## 💬 和 {engine.name} 聊天\n支持 Markdown 和 LaTeX（`$x^2$`、`$$\\int$$`）。")
        chatbot = gr.Chatbot(elem_id="chatbot", height=480, latex_delimiters=LATEX_DELIMITERS, **chatbot_kwargs)
        with gr.Row():
            message = gr.Textbox(elem_id="message", placeholder="输入消息，回车发送", show_label=False, scale=8)
            send = gr.Button("发送", elem_id="send", variant="primary", scale=1)
            clear = gr.Button("清空", elem_id="clear", scale=1)
        with gr.Row():
            temperature = gr.Slider(0, 2, value=options.temperature, step=0.05, label="temperature（0 = 贪心）")
            top_p = gr.Slider(0.05, 1, value=options.top_p, step=0.05, label="top_p")
            max_new_tokens = gr.Slider(1, max(1, min(4096, engine.context_window - 1)), step=1,
                                       value=min(options.max_new_tokens, engine.context_window - 1),
                                       label="max_new_tokens")
        system = gr.Textbox(value=system, label="系统提示（可选）")
        inputs = [chatbot, system, temperature, top_p, max_new_tokens]
        for event in (message.submit, send.click):
            # Gradio runs one event at a time unless told otherwise: several pages share the engine's batches.
            event(add_user_turn, [message, chatbot], [message, chatbot], queue=False).then(
                stream_answer, inputs, chatbot, concurrency_limit=MAX_CONCURRENT)
        clear.click(lambda: [], None, chatbot, queue=False)
    return demo


# ---------------------------------------------------------------------------------------------------------------
# 4. OpenAI-compatible API (FastAPI + pydantic): every request field is honoured or refused with a 400
# ---------------------------------------------------------------------------------------------------------------
MAX_CONCURRENT = 16  # requests served at once (the engine batches them); more wait
MAX_N = 8
REFUSED = {  # fields of OpenAI's request that this server cannot honour, and why (anything else unknown: 400 too)
    "tools": "no tool calling", "tool_choice": "no tool calling", "functions": "no tool calling",
    "function_call": "no tool calling", "parallel_tool_calls": "no tool calling", "audio": "text only",
    "modalities": "text only", "prediction": "no predicted outputs", "reasoning_effort": "not a reasoning model",
    "web_search_options": "no web search", "verbosity": "no verbosity control", "store": "nothing is stored",
    "metadata": "nothing is stored", "service_tier": "one service tier", "user": "no per-user tracking",
    "safety_identifier": "no per-user tracking", "prompt_cache_key": "no prompt cache",
}


def api_models():
    """The request as pydantic models (built on first use: pydantic comes with FastAPI)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)  # unknown fields and wrong types: a 400

    class TextPart(Strict):
        type: Literal["text"]
        text: str

    class Message(Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: Optional[Union[str, list[TextPart]]] = None

    class StreamOptions(Strict):
        include_usage: bool = False

    class ResponseFormat(Strict):
        type: Literal["text"]  # json_object / json_schema are refused: nothing constrains the output

    class ChatRequest(Strict):
        model: str  # one model is served; any name gets it, and the answer names it
        messages: list[Message] = Field(min_length=1)
        max_tokens: Optional[int] = Field(None, ge=1)
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        temperature: Optional[float] = Field(None, ge=0, le=2)
        top_p: Optional[float] = Field(None, ge=0, le=1)
        n: Optional[int] = Field(None, ge=1, le=MAX_N)
        stop: Optional[Union[str, list[str]]] = None
        seed: Optional[int] = None
        presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
        frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
        logit_bias: Optional[dict[str, float]] = None
        logprobs: Optional[bool] = None
        top_logprobs: Optional[int] = Field(None, ge=0, le=20)
        stream: Optional[bool] = None
        stream_options: Optional[StreamOptions] = None
        response_format: Optional[ResponseFormat] = None

        @field_validator("stop")
        @classmethod
        def up_to_four(cls, stop):
            stop = [stop] if isinstance(stop, str) else stop
            if stop is not None and (len(stop) > 4 or not all(stop)):
                raise ValueError("'stop' must be a string or a list of up to 4 non-empty strings")
            return stop

    return ChatRequest


class BadRequest(ValueError):
    def __init__(self, message, param=None, code=None):
        super().__init__(message)
        self.param, self.code = param, code


def parse_chat_request(raw, options, engine):
    """The JSON body -> (Options, messages, n, stream, include_usage), or a BadRequest naming the field."""
    from dataclasses import replace

    from pydantic import ValidationError
    try:
        body = json.loads(raw)
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if isinstance(body, dict):
        for key in body:
            if key in REFUSED and body[key] is not None:
                raise BadRequest(f"'{key}' is not supported by this server ({REFUSED[key]})", key,
                                 "unsupported_parameter")
    try:
        request = api_models().model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        param = field_path(first["loc"])
        what = "is not a field of a chat completion request" if first["type"] == "extra_forbidden" else first["msg"]
        raise BadRequest(f"{param or 'body'}: {what}", param or None) from None
    top = request.top_logprobs or 0
    if top and not request.logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    bias = []
    for key, value in (request.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= len(engine.tokenizer) or not -100 <= value <= 100:
            raise BadRequest(f"logit_bias: {key!r} must be a token id below {len(engine.tokenizer)}, its bias "
                             f"between -100 and 100", "logit_bias")
        bias.append((int(key), value))
    asked = replace(options, stop=tuple(request.stop or ()), seed=request.seed, logprobs=bool(request.logprobs),
                    top_logprobs=top, logit_bias=tuple(bias), presence_penalty=request.presence_penalty or 0.0,
                    frequency_penalty=request.frequency_penalty or 0.0)
    for key in ("temperature", "top_p"):
        if getattr(request, key) is not None:
            asked = replace(asked, **{key: getattr(request, key)})
    new_tokens = request.max_completion_tokens or request.max_tokens
    if new_tokens:
        asked = replace(asked, max_new_tokens=new_tokens)
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])}
                for m in request.messages]
    for i, m in enumerate(request.messages):
        if m.content is None and m.role != "assistant":
            raise BadRequest(f"messages[{i}].content is required", f"messages[{i}].content")
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return asked, messages, request.n or 1, bool(request.stream), include_usage


def field_path(loc):
    """pydantic's error location -> OpenAI's param: ("messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict"):
            path += ("." if path else "") + part
        else:  # a union branch ("list[TextPart]"): the field itself is the param
            break
    return path


def logprobs_json(entries):
    token = lambda text, value: {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
    return {"content": [dict(token(e["token"], e["logprob"]), top_logprobs=[token(t, v) for t, v in e["top"]])
                        for e in entries]}


async def stream_pieces(replies):
    """(choice index, text piece | None at its end | an exception) from all replies, as they arrive.
    Each reply is read in its own thread, so that none waits for another."""
    import threading
    loop, inbox = asyncio.get_running_loop(), asyncio.Queue()

    def read(index, reply):
        try:
            for piece in reply:
                loop.call_soon_threadsafe(inbox.put_nowait, (index, piece))
            loop.call_soon_threadsafe(inbox.put_nowait, (index, None))
        except Exception as failure:
            loop.call_soon_threadsafe(inbox.put_nowait, (index, failure))

    for index, reply in enumerate(replies):
        threading.Thread(target=read, args=(index, reply), daemon=True).start()
    for _ in range(len(replies)):
        while True:
            index, item = await inbox.get()
            yield index, item
            if item is None or isinstance(item, Exception):
                break


def api_error(status, message, param=None, code=None, kind="invalid_request_error"):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class Completion:
    """The answer to one chat-completions request: its n replies, as one JSON object or as Server-Sent Events."""

    def __init__(self, model_id, replies, logprobs):
        self.model_id, self.replies, self.want_logprobs = model_id, replies, logprobs
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def usage(self):
        prompt, completion = self.replies[0].prompt_tokens, sum(r.completion_tokens for r in self.replies)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs(self, entries):
        return logprobs_json(entries) if self.want_logprobs else None

    def cancel(self):  # the client went away, or the answer is complete: stop generating
        for reply in self.replies:
            reply.cancel()

    async def whole(self):
        try:
            async for _, item in stream_pieces(self.replies):
                if isinstance(item, Exception):
                    return api_error(500, f"generation failed: {first_line(item)}", kind="server_error")
        finally:
            self.cancel()
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason, "logprobs": self.logprobs(r.logprobs)}
                            for i, r in enumerate(self.replies)],
                "usage": self.usage()}

    def chunk(self, choices, **more):
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                "choices": choices, **more}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, include_usage):
        """Server-Sent Events, as OpenAI streams them: a role chunk, the text pieces, [usage,] [DONE]."""
        replies, sent = self.replies, [0] * len(self.replies)  # logprob entries already sent, per choice
        try:
            yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                               "logprobs": None} for i in range(len(replies))])
            async for i, item in stream_pieces(replies):
                if isinstance(item, Exception):
                    raise item
                entries, sent[i] = replies[i].logprobs[sent[i]:], len(replies[i].logprobs)
                delta = {"content": item} if item is not None else {}
                yield self.chunk([{"index": i, "delta": delta, "logprobs": self.logprobs(entries),
                                   "finish_reason": None if item is not None else replies[i].finish_reason}])
            if include_usage:
                yield self.chunk([], usage=self.usage())  # OpenAI's usage chunk has no choices
            yield "data: [DONE]\n\n"
        except Exception as failure:
            payload = {"error": {"message": f"generation failed: {first_line(failure)}", "type": "server_error"}}
            yield f"data: {json.dumps(payload)}\n\n"
        finally:  # also runs when the client goes away mid-answer: its generation stops
            self.cancel()


def build_api_app(engine, options, model_id, api_key=None):
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI(title=f"OpenAI-compatible API · {model_id}")
    created = int(time.time())

    def unauthorized(request):
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return api_error(401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY').",
                             code="invalid_api_key")
        return None

    @app.get("/v1/models")
    async def list_models(request: Request):
        if denied := unauthorized(request):
            return denied
        model = {"id": model_id, "object": "model", "created": created, "owned_by": "local"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if denied := unauthorized(request):
            return denied
        try:
            asked, messages, n, stream, include_usage = parse_chat_request(await request.body(), options, engine)
            seeds = [asked.seed if asked.seed is None else asked.seed + i for i in range(n)]  # n different samples
            # trim=False: an API client sends the whole conversation it wants, so nothing is left out silently
            replies = [engine.reply(messages, asked, trim=False, seed=seed) for seed in seeds]
        except BadRequest as bad:
            return api_error(400, str(bad), bad.param, bad.code)
        except PromptError as bad:
            too_long = "context_length_exceeded" if isinstance(bad, ContextTooLong) else None
            return api_error(400, str(bad), "messages", too_long)
        completion = Completion(model_id, replies, asked.logprobs)
        if not stream:
            return await completion.whole()
        return StreamingResponse(completion.events(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


# ---------------------------------------------------------------------------------------------------------------
# 5. main
# ---------------------------------------------------------------------------------------------------------------
def check_port(host, port):
    """Fails before the model is loaded (minutes) when the server could not listen on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except socket.gaierror:
            raise UserError(f"--host {host} 不是本机的地址：用 127.0.0.1（只有本机能访问）"
                            f"或 0.0.0.0（局域网也能访问）") from None
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"端口 {host}:{port} 已被占用：用 --port 换一个，或先关掉占用它的程序") from None
            raise UserError(f"无法在 {host}:{port} 上监听（{error.strerror}）：--host 用 127.0.0.1 或 0.0.0.0，"
                            f"--port 用 1024 以上的端口") from None


def canonical_dtype(text):
    return OLD_DTYPE_NAMES.get(text, text)


def parse_arguments(argv=None):
    p = ArgumentParser(description="Task 0：在终端、网页或 OpenAI 风格的 API 里和本地模型聊天")
    p.add_argument("--model", default=DEFAULT_MODEL, help="模型目录或 🤗 hub id（默认 %(default)s）")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto：有 GPU 就用（选哪张卡：CUDA_VISIBLE_DEVICES）")
    # float32 / float16 / bfloat16 (the earlier spellings) still work; nf4 is the earlier --quant 4bit
    p.add_argument("--dtype", default="auto", type=canonical_dtype, choices=[*DTYPE_CHOICES, "nf4"],
                   metavar="{" + ",".join(DTYPE_CHOICES) + "}",
                   help="auto：GPU 上 bf16/fp16，CPU 上 fp32（CPU 有 bf16 单元时 bf16 快约 1.7 倍）")
    p.add_argument("--quant", default="auto", choices=["auto", "none", "4bit"],
                   help="4bit = bitsandbytes NF4；auto：ChatGLM2 在半精度装不下时用 4bit")
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
    p.add_argument("--batching", default="auto", choices=["auto", "paged", "generate"],
                   help="并发请求怎样一起算：auto = 模型支持时用连续批处理（continuous batching），否则批量 generate")
    p.add_argument("--convert", nargs=2, metavar=("SRC", "OUT"),
                   help="把 THUDM 的 ChatGLM2 目录转成原生 glm 目录后退出")
    args = parse_args(p, argv)
    if args.dtype == "nf4":
        args.dtype, args.quant = "auto", "4bit"
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("需要 --max-new-tokens ≥ 1、--temperature ≥ 0、0 < --top-p ≤ 1")
    if args.port is not None and not 0 < args.port < 65536:
        p.error("--port 要在 1 到 65535 之间")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # a console that cannot show Chinese gets '?', not a crash
    if args.convert:
        convert_chatglm2.convert(*args.convert)
        return
    port = args.port or (8000 if args.api else 7860)
    if args.web or args.api:
        check_port(args.host, port)
    options = Options(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    print(f"正在加载 {args.model} …", file=sys.stderr)
    model, tokenizer, device = load_model(args.model, args.device, args.dtype, args.trust_remote_code, args.quant)
    name = Path(args.model.rstrip("/")).name
    engine = ChatEngine(model, tokenizer, name, batching=args.batching, sampling=args.temperature > 0)
    how = "连续批处理 continuous batching" if engine.paged else "批量 generate"
    precision = str(model.dtype).replace("torch.", "")
    print(f"已加载 {name}（{device}，{precision}，上下文 {engine.context_window} tokens，并发请求：{how}）",
          file=sys.stderr)
    try:
        front_end(engine, options, args, name, port)
    finally:
        engine.close()


def front_end(engine, options, args, name, port):
    if args.web:
        if "COLAB_RELEASE_TAG" in os.environ and not args.share:
            print("提示：在 Colab 上请加 --share，才能在浏览器里打开网页。", file=sys.stderr)
        page = build_web_app(engine, options, args.system)
        page.queue().launch(server_name=args.host, server_port=port, share=args.share)
    elif args.api:
        import uvicorn
        print(f"OpenAI 兼容接口：http://{args.host}:{port}/v1  （model = {name!r}）", file=sys.stderr)
        uvicorn.run(build_api_app(engine, options, name, args.api_key), host=args.host, port=port)
    else:
        terminal(Chat(engine, options, system=args.system, user_name="用户"), args)


if __name__ == "__main__":
    run_main(main)
