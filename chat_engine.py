"""chat_engine.py —— Task 0（ChatGLM.py）和 Task 8（ChatGPT2-base.py）共用的对话引擎。

它持有模型、对话模板、历史裁剪、流式输出、停止规则和对话记录；终端、网页、API 只是它的前端。
同时来的请求一起算：模型支持分页注意力时用 transformers 的连续批处理（continuous batching），
否则（比如我们手写的 GPT-2）用左填充的批量 generate。

The engine behind both chat scripts. It holds the model, the chat template, history fitting, streaming, the
stop rule and the transcript; the terminal, the web page and the API are front ends over it. Concurrent
requests are computed together: with transformers' continuous batching where the model supports paged
attention, else with one left-padded `generate` call per batch.

The path of one typed question (four calls, all on this page):

    Chat.ask(text)                               the conversation: history, transcript, printing
      -> ChatEngine.reply(messages, options)     chat template, history fitted to the window -> a Reply
        -> Paged.submit(reply)                   transformers' scheduler: manager.add_request(...)
           or Batched.submit(reply) -> Batched.run(batch) -> model.generate(...)

A Reply is an iterator of text pieces; the backends push token ids into it from their own thread.
"""
import atexit
import copy
import json
import queue
import re
import sys
import threading
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from course_utils import UserError, atomic_path


class PromptError(ValueError):
    """The conversation cannot become a prompt: a 400 for the API, a one-line note in the terminal."""


class ContextTooLong(PromptError):
    pass


@dataclass
class Options:
    """How to answer one request. Every field is honoured by both backends (see Reply and the backends)."""
    max_new_tokens: int = 512
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.8
    repetition_penalty: float = 1.0  # transformers' multiplicative penalty (Task 8 uses 1.1)
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token has appeared in the reply
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the reply
    seed: int | None = None  # same seed, same answer
    stop: tuple = ()  # strings that end the reply (not included)
    logprobs: bool = False
    top_logprobs: int = 0
    min_new_tokens: int = 0
    logit_bias: tuple = ()  # (token id, bias) pairs, OpenAI's logit_bias

    @property
    def greedy(self):
        return self.temperature <= 0 or self.top_p <= 0

    def needs_generate(self):
        """What transformers' continuous batching cannot do per request yet: these run through generate()."""
        return (self.seed is not None or self.logprobs or self.repetition_penalty != 1.0 or self.min_new_tokens > 0
                or self.presence_penalty != 0 or self.frequency_penalty != 0 or bool(self.logit_bias))


MAX_BATCH = 8  # requests computed together at most (ChatGLM.py's setting; bench_chat sizes serve-cb-bf16 from it)


# ---------------------------------------------------------------------------------------------------------------
# The engine: model + tokenizer + template; one reply per request
# ---------------------------------------------------------------------------------------------------------------
class ChatEngine:
    """One model shared by every front end and every concurrent request."""

    def __init__(self, model, tokenizer, name="model", batching="auto", max_batch=MAX_BATCH, around=nullcontext,
                 sampling=True):
        """batching: "auto" (continuous batching when the model supports it), "paged" or "generate".
        around: a context every generate() call runs in (Task 8's --compare: the adapter switched off).
        sampling: False when most requests will be greedy (a server started with --temperature 0): the scheduler
        then picks the top token directly, without sorting the vocabulary for each request at every step, and the
        rare sampling request goes through generate()."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.context_window = context_window(model.config, tokenizer)
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = list(dict.fromkeys(i for i in eos + [tokenizer.eos_token_id] if i is not None)) or [0]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        # The stop rule, the same for every model: an end-of-turn token, or the model starting the next user turn
        # by itself (a line beginning "Human:" for Task 8's template, "User:" for the plain prompt).
        self.turn_marker = user_turn_marker(self) if self.has_template else "User:"
        self.remote_code = hasattr(model, "stream_chat")  # ChatGLM-6B v1's own chat loop (legacy environment)
        use_paged = batching == "paged" or (batching == "auto" and can_page(model))
        self.paged = Paged(self, max_batch, sampling) if use_paged and not self.remote_code else None
        self.batched = (StreamChat(self) if self.remote_code else
                        Batched(self, max_batch, pause=self.paged.pause if self.paged else nullcontext,
                                around=around or nullcontext))
        atexit.register(self.close)  # a process that ends while a backend computes would abort in C++

    def render(self, messages):
        """The prompt text the model sees: the tokenizer's chat template when it has one."""
        if not self.has_template:
            lines = [messages[0]["content"] + "\n"] if messages and messages[0]["role"] == "system" else []
            lines += [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                      for m in messages if m["role"] != "system"]
            return "\n".join(lines) + "\nAssistant:"
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # the template's own raise_exception(), e.g. "roles must alternate"
            if len(messages) > 1 and messages[0]["role"] == "system":  # some templates have no system role
                merged = [dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])]
                return self.render(merged + messages[2:])
            raise PromptError(f"the chat template rejected these messages: {first_line(error)}") from None

    def prompt_ids(self, messages):
        return self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]

    def fit(self, messages, max_new_tokens, trim=True):
        """Drops the oldest turns (a question and its answers; never the system prompt, never the last question)
        until prompt + max_new_tokens fits the window. trim=False (the API) only checks that the prompt fits.
        Returns (messages kept, prompt ids, max_new_tokens that fit, number of questions dropped)."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest, dropped = list(messages[len(system):]), 0
        ids = self.prompt_ids(system + rest)
        while trim and len(ids) + max_new_tokens > self.context_window and len(rest) > 1:
            rest = rest[1:]
            while len(rest) > 1 and rest[0]["role"] != "user":  # the history starts with a question again
                rest = rest[1:]
            dropped += 1
            ids = self.prompt_ids(system + rest)
        if len(ids) >= self.context_window:
            raise ContextTooLong(f"这段输入有 {len(ids)} 个 token，超过了模型的上下文长度 {self.context_window}"
                                 f"（the prompt has {len(ids)} tokens; the context window is {self.context_window}）")
        return system + rest, ids, min(max_new_tokens, self.context_window - len(ids)), dropped

    def reply(self, messages, options=None, trim=True, **changes):
        """Starts one answer to `messages` (the last one a question) and returns its Reply at once."""
        options = replace(options or Options(), **changes)
        messages = [{"role": m["role"], "content": message_text(m["content"])} for m in messages]
        messages, ids, max_new_tokens, dropped = self.fit(messages, options.max_new_tokens, trim)
        reply = Reply(self, ids, replace(options, max_new_tokens=max_new_tokens), dropped, messages)
        paged = self.paged is not None and not options.needs_generate() and (self.paged.sampling or options.greedy)
        backend = self.paged if paged else self.batched
        backend.submit(reply)
        return reply

    def close(self):
        """Ends every reply and stops the backends' threads (a process must not exit while they compute)."""
        if self.paged is not None:
            self.paged.close()
        self.batched.close()


def context_window(config, tokenizer):
    """How many tokens the model sees (prompt + reply), from its config."""
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


def user_turn_marker(engine):
    """The text that starts a user turn in the chat template ("Human:" for Task 8, "问：" for ChatGLM2), or None
    when turns are delimited by special tokens (the model's end-of-turn token then ends its reply)."""
    probe = [{"role": "user", "content": "PROBE-Q"}, {"role": "assistant", "content": "PROBE-A"},
             {"role": "user", "content": "PROBE-Q2"}]
    try:
        text = engine.tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:
        return None
    between = text[text.find("PROBE-A") + len("PROBE-A"):text.find("PROBE-Q2")].lstrip()
    eos = engine.tokenizer.eos_token or ""
    if eos and between.startswith(eos):  # "<|endoftext|>\nHuman: ": the answer's end, then the next question
        between = between[len(eos):]
    if any(token and token in between for token in engine.tokenizer.all_special_tokens):
        return None
    marker = between.strip().split("\n")[-1].strip()
    return marker or None


def can_page(model):
    """transformers' continuous batching needs a model that uses its attention interface (paged attention)."""
    return (hasattr(model, "init_continuous_batching") and getattr(model, "_supports_attention_backend", False)
            and getattr(model, "hf_quantizer", None) is None and not hasattr(model, "peft_config"))


def message_text(content):
    """OpenAI and Gradio may send content as a list of parts: [{"type": "text", "text": "..."}]."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------------------
# One streamed answer, and the stop rule
# ---------------------------------------------------------------------------------------------------------------
class Reply:
    """Iterate for text pieces; afterwards read text, finish_reason ("stop", "length" or "interrupted"),
    prompt_tokens, completion_tokens, dropped (questions left out of the prompt) and logprobs.

    The pieces add up to exactly `text`: the decoded reply without its leading and trailing whitespace, cut
    before the first stop string or the start of a new user turn. Text that may still become one is held back."""

    def __init__(self, engine, prompt_ids, options, dropped, messages=()):
        self.engine, self.prompt_ids, self.options, self.dropped = engine, prompt_ids, options, dropped
        self.messages = messages  # what fit(): for a backend that wants messages, not ids (StreamChat)
        self.decoded = None  # set instead of ids by a backend that produces text (StreamChat)
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.text, self.finish_reason, self.logprobs = "", None, []
        self.ids, self.events, self.cancelled = [], queue.Queue(), threading.Event()
        self.cancel_hook = None  # set by the backend: tells it to stop generating this reply
        marker = engine.turn_marker
        self.marker = re.compile(r"(?:^|\n)[ \t]*" + re.escape(marker)) if marker else None
        self._iterator = None

    # The backend's side (called from its thread)
    def push(self, token_ids, logprobs=()):
        self.events.put(("tokens", list(token_ids), list(logprobs)))

    def push_text(self, text, token_count):
        """For a backend that only has text: the whole reply so far and its length in tokens."""
        self.events.put(("text", text, token_count))

    def finish(self, error=None):
        self.events.put(("end", error, None))

    # The reader's side
    def cancel(self):
        """Stop generating (Ctrl-C, a closed page, a client that hung up); safe from any thread, at any time."""
        self.cancelled.set()
        if self.finish_reason is None:
            self.finish_reason = "interrupted"
            self.completion_tokens = len(self.ids)
        if self.cancel_hook is not None:
            self.cancel_hook()

    close = cancel

    def __iter__(self):
        if self._iterator is None:
            self._iterator = self._pieces()
        return self._iterator

    def _pieces(self):
        error = None
        try:
            while True:
                try:
                    kind, value, logprobs = self.events.get(timeout=0.1)  # a timeout keeps Ctrl-C responsive
                except queue.Empty:
                    continue
                if kind == "end":
                    error = value
                    break
                if kind == "text":
                    self.decoded, count = value, logprobs
                else:
                    self.ids += value
                    self.logprobs += logprobs
                visible, stopped = self._visible(final=False)
                if stopped:
                    self.finish_reason = "stop"
                    self.cancel()
                if len(visible) > len(self.text):
                    piece, self.text = visible[len(self.text):], visible
                    yield piece
                if stopped:
                    break
            if error is not None:
                raise error
            visible, _ = self._visible(final=True)
            if len(visible) > len(self.text):
                piece, self.text = visible[len(self.text):], visible
                yield piece
        except BaseException:  # Ctrl-C, or the reader went away (GeneratorExit)
            self.cancel()
            self.finish_reason = self.finish_reason or "interrupted"
            raise
        finally:
            self.completion_tokens = len(self.ids) if self.decoded is None else count
        if self.finish_reason is None:
            self._set_finish_reason()

    def _visible(self, final):
        """(the part of the reply that may be shown now, whether a stop string or user turn was found)."""
        text = self.decoded
        if text is None:
            text = self.engine.tokenizer.decode(self.ids, skip_special_tokens=True)
        text = text.lstrip()
        if not final:  # a trailing '\ufffd' is half of a character (byte-level BPE): wait for the rest
            text = text.rstrip("\ufffd")
        cuts = [text.find(s) for s in self.options.stop if s and s in text]
        match = self.marker.search(text) if self.marker else None
        if match:
            cuts.append(match.start())
        if cuts:
            return text[:min(cuts)].rstrip(), True
        safe = len(text.rstrip())  # trailing whitespace waits: it is dropped if the reply ends there
        if not final:
            holds = [k for s in self.options.stop for k in range(1, len(s)) if text.endswith(s[:k])]
            safe = min(safe, len(text) - max(holds, default=0))
            if self.marker:  # a last line that could still grow into the user-turn marker
                line_start = text.rfind("\n") + 1
                if self.engine.turn_marker.startswith(text[line_start:].lstrip(" \t")):
                    safe = min(safe, max(line_start - 1, 0))
        return text[:safe], False

    def _set_finish_reason(self):
        ended_on_eos = bool(self.ids) and self.ids[-1] in self.engine.eos_ids
        if ended_on_eos:
            self.finish_reason = "stop"
        elif self.cancelled.is_set():
            self.finish_reason = "interrupted"
        else:
            self.finish_reason = "length" if len(self.ids) >= self.options.max_new_tokens else "stop"


# ---------------------------------------------------------------------------------------------------------------
# Backend 1: transformers' continuous batching (paged attention), for models that support it
# ---------------------------------------------------------------------------------------------------------------
def cpu_cache_sizes(max_batch, context_window):
    """The continuous-batching cache on a CPU: room for max_batch requests of up to 2048 tokens, in blocks of 256
    tokens, and at most 1024 tokens a step (transformers' default on a CPU takes a share of all RAM: 13.6 GB for
    SmolLM2-135M on a 24 GB machine)."""
    return dict(num_blocks=max_batch * max(1, min(context_window, 2048) // 256), max_batch_tokens=1024)


class Paged:
    """Requests join and leave the running batch at every step: transformers' own scheduler does it
    (model.init_continuous_batching, the machinery of `transformers serve --continuous-batching`).

    Per request it honours max_new_tokens, temperature, top_p and greedy decoding (top_k=1); requests with
    settings it cannot apply per request (seed, penalties, logprobs) go to Batched, which pauses this loop.
    With sampling=False it decodes greedily only (argmax, no per-request processors: faster). With sampling=True a
    greedy request is top_k=1, which keeps every token tied for the top score: under an exact tie (possible in
    fp16/bf16 logits) it may take either; start a greedy server with --temperature 0 for the exact argmax."""

    def __init__(self, engine, max_batch, sampling=True):
        from transformers import ContinuousBatchingConfig
        self.engine, model, self.sampling = engine, engine.model, sampling
        # Per-request temperature/top_p/top_k exist only if the shared config creates those processors.
        self.top_k = getattr(model.generation_config, "top_k", None) or 50
        config = GenerationConfig(do_sample=sampling, max_new_tokens=engine.context_window,
                                  eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id,
                                  **(dict(temperature=0.5, top_p=0.5, top_k=self.top_k) if sampling else {}))
        # on a GPU the library sizes the cache from free memory; on a CPU it would take a share of all RAM
        sizes = cpu_cache_sizes(max_batch, engine.context_window) if model.device.type == "cpu" else {}
        cb_config = ContinuousBatchingConfig(per_request_processors=sampling, **sizes)
        self.manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb_config)
        self.replies, self.lock = {}, threading.Lock()
        # Started from a daemon thread, the library's loop thread is a daemon too: it never keeps a script alive.
        started = threading.Event()
        threading.Thread(target=self._route, args=(started,), daemon=True, name="paged-router").start()
        started.wait()

    def submit(self, reply):
        o = reply.options
        sampling = dict(temperature=1.0, top_p=1.0, top_k=1) if o.greedy else dict(
            temperature=float(o.temperature), top_p=float(o.top_p), top_k=self.top_k)
        sampling = sampling if self.sampling else {}
        with self.lock:
            request_id = self.manager.add_request(reply.prompt_ids, max_new_tokens=o.max_new_tokens, streaming=True,
                                                  eos_token_id=self.engine.eos_ids, **sampling)
            if request_id is None:
                raise RuntimeError("the continuous-batching loop is not accepting requests")
            self.replies[request_id] = [reply, 0]
        reply.cancel_hook = lambda: self._cancel(request_id)

    def _cancel(self, request_id):
        """The library drops a cancelled request without a last result: the reply is ended here."""
        self.manager.cancel_request(request_id)
        with self.lock:
            entry = self.replies.pop(request_id, None)
        if entry is not None:
            entry[0].finish()

    def pause(self):
        """Holds the loop still while Batched uses the model (its cache and running requests are kept)."""
        return self.manager.pause()

    def _route(self, started):
        """Starts the library's loop, then delivers its results to their replies."""
        self.manager.start()
        started.set()
        while True:
            output = self.manager.get_result(timeout=0.2)
            if output is None:
                fatal = self.manager.background_thread_status.fatal_error
                if fatal is not None or not self.manager.is_running():
                    self._fail_all(fatal or RuntimeError("the continuous-batching loop stopped"))
                    return
                continue
            with self.lock:
                entry = self.replies.get(output.request_id)
            if entry is None:
                continue
            reply, seen = entry
            new = output.generated_tokens[seen:]
            entry[1] = len(output.generated_tokens)
            if new:
                reply.push(new)
            if output.error is not None or output.is_finished():
                with self.lock:
                    self.replies.pop(output.request_id, None)
                reply.finish(RuntimeError(f"generation failed: {output.error}") if output.error else None)

    def _fail_all(self, error):
        with self.lock:
            replies, self.replies = list(self.replies.values()), {}
        for reply, _ in replies:
            reply.finish(error)

    def close(self):
        with self.lock:
            replies = [reply for reply, _ in self.replies.values()]
        for reply in replies:
            reply.cancel()
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=30)


# ---------------------------------------------------------------------------------------------------------------
# Backend 2: batched model.generate() with left padding, for any model (our GPT-2, PEFT adapters)
# ---------------------------------------------------------------------------------------------------------------
class Batched:
    """Requests that wait while a batch runs go together into the next generate() call, left-padded.
    Requests are batched only with others of the same settings (generate takes one config per call);
    one with a seed runs alone, so its answer depends on nothing else."""

    def __init__(self, engine, max_batch, pause=nullcontext, around=nullcontext):
        self.engine, self.max_batch, self.pause, self.around = engine, max_batch, pause, around
        self.inbox, self.waiting, self.running = queue.Queue(), [], []
        self.thread = threading.Thread(target=self._loop, daemon=True, name="batched-generate")
        self.thread.start()

    def submit(self, reply):
        self.inbox.put(reply)

    def close(self):
        if self.thread.is_alive():
            for reply in self.running + self.waiting:
                reply.cancel()
            self.inbox.put(None)
            self.thread.join(timeout=30)

    def _loop(self):
        while True:
            if not self.waiting:
                self.waiting.append(self.inbox.get())
            while not self.inbox.empty():
                self.waiting.append(self.inbox.get_nowait())
            if None in self.waiting:  # close()
                return
            key = batch_key(self.waiting[0])
            batch = [r for r in self.waiting if batch_key(r) == key][:self.max_batch]
            self.waiting = [r for r in self.waiting if r not in batch]
            for reply in [r for r in batch if r.cancelled.is_set()]:  # its reader left while it waited
                reply.finish()
                batch.remove(reply)
            if not batch:
                continue
            self.running = batch
            error = self.run_beside_the_paged_loop(batch) if self.engine.paged else self.run_paused(batch)
            self.running = []
            for reply in batch:
                reply.finish(error)

    def run_paused(self, batch):
        """Runs the batch with the continuous-batching loop held still; returns the exception, if any."""
        try:
            with self.pause(), self.around(), paged_attention_off(self.engine.model):
                self.run(batch)
        except Exception as failure:  # reaches every reader of this batch as the exception
            return failure
        return None

    def run_beside_the_paged_loop(self, batch):
        """The same, on a thread that ends with the batch. Every thread that computes has its own OpenMP thread
        pool, and once there are more pool threads than cores, GNU OpenMP stops letting idle threads spin between
        operations: each small operation then waits for its threads to wake up. A generate() thread that stayed
        alive beside the continuous-batching loop's thread made every later reply slow (SmolLM2-135M on 2 cores:
        26 tokens/s before the first seeded request, 15.5 after it); a thread that ends frees its pool."""
        result = []
        worker = threading.Thread(target=lambda: result.append(self.run_paused(batch)), name="generate-batch")
        worker.start()
        worker.join()
        return result[0] if result else RuntimeError("the generate() thread ended without a result")

    def run(self, batch):
        """One generate() call for the whole batch; each row streams into its own Reply."""
        engine, o = self.engine, batch[0].options
        width = max(len(r.prompt_ids) for r in batch)
        rows = [[engine.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch]
        mask = [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch]
        config = copy.deepcopy(engine.model.generation_config)
        sampling = dict(do_sample=False, temperature=1.0, top_p=1.0) if o.greedy else dict(
            do_sample=True, temperature=o.temperature, top_p=o.top_p)
        config.update(max_new_tokens=max(r.options.max_new_tokens for r in batch), min_new_tokens=o.min_new_tokens,
                      repetition_penalty=o.repetition_penalty, eos_token_id=engine.eos_ids,
                      pad_token_id=engine.pad_id, **sampling)
        processors = []
        if o.presence_penalty or o.frequency_penalty:
            processors.append(OpenAIPenalties(o.presence_penalty, o.frequency_penalty, width))
        if o.logit_bias:
            processors.append(LogitBias(o.logit_bias))
        recorder = LogprobRecorder() if o.logprobs else None
        if recorder:
            processors.append(recorder)  # last: it sees the scores the token is drawn from
        streamer = RowStreamer(batch, engine.eos_ids, engine.tokenizer, recorder, o.top_logprobs)
        if o.seed is not None:
            torch.manual_seed(o.seed)
        device = engine.model.device
        engine.model.generate(input_ids=torch.tensor(rows, device=device),
                              attention_mask=torch.tensor(mask, device=device),
                              generation_config=config, streamer=streamer, logits_processor=processors or None,
                              stopping_criteria=StoppingCriteriaList([streamer]))


def batch_key(reply):
    o = asdict(reply.options)
    for per_row in ("max_new_tokens", "stop"):  # each row stops by itself
        o.pop(per_row)
    return (id(reply),) if reply.options.seed is not None else tuple(sorted(o.items()))


def paged_attention_off(model):
    """Continuous batching may switch an eager model to "paged|eager", which needs its paged cache; plain
    generate() (while the loop is paused) runs with the original implementation, restored afterwards."""
    from contextlib import contextmanager

    @contextmanager
    def switched():
        current = getattr(model.config, "_attn_implementation", None) or ""
        if current.startswith("paged|"):
            model.set_attn_implementation(current.split("|", 1)[1])
            try:
                yield
            finally:
                model.set_attn_implementation(current)
        else:
            yield
    return switched()


class RowStreamer(BaseStreamer, StoppingCriteria):
    """generate()'s streamer and stopping criterion in one: row i's new token goes to batch[i] until that row
    ends (its end-of-turn token, its own max_new_tokens, or its reader cancelled)."""

    def __init__(self, batch, eos_ids, tokenizer, recorder=None, top_logprobs=0):
        self.batch, self.eos_ids, self.tokenizer = batch, set(eos_ids), tokenizer
        self.recorder, self.top = recorder, top_logprobs
        self.counts, self.done, self.prompt_seen = [0] * len(batch), [False] * len(batch), False

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompts themselves
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        for i, (reply, token) in enumerate(zip(self.batch, tokens)):
            if self.done[i]:
                continue
            reply.push([token], [self._logprob(i, token)] if self.recorder else [])
            self.counts[i] += 1
            self.done[i] = (token in self.eos_ids or self.counts[i] >= reply.options.max_new_tokens
                            or reply.cancelled.is_set())

    def _logprob(self, row, token):
        logp = self.recorder.last[row]
        entry = {"token": self.tokenizer.decode([token]), "logprob": finite(logp[token].item()), "top": []}
        if self.top:
            values, ids = logp.topk(self.top)
            entry["top"] = [(self.tokenizer.decode([t]), finite(v)) for t, v in zip(ids.tolist(), values.tolist())]
        return entry

    def end(self):
        pass

    def __call__(self, input_ids, scores, **kwargs):
        done = [d or r.cancelled.is_set() for d, r in zip(self.done, self.batch)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, on the reply's own tokens (not the prompt's):
    logit -= presence * [token already in the reply] + frequency * (its count in the reply)."""

    def __init__(self, presence, frequency, prompt_width):
        self.presence, self.frequency, self.prompt_width = presence, frequency, prompt_width

    def __call__(self, input_ids, scores):
        reply = input_ids[:, self.prompt_width:]
        counts = torch.zeros_like(scores).scatter_add_(1, reply, torch.ones_like(reply, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: a fixed number added to chosen tokens' logits (-100 bans a token, 100 forces it)."""

    def __init__(self, pairs):
        self.ids, self.bias = [int(i) for i, _ in pairs], [float(b) for _, b in pairs]

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.ids] += torch.tensor(self.bias, dtype=scores.dtype, device=scores.device)
        return scores


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-probabilities of the step's final scores (after temperature, top_p and penalties; for greedy
    decoding the model's own) so that the streamer can report the chosen token's and the top alternatives'."""
    last = None

    def __call__(self, input_ids, scores):
        self.last = scores.float().log_softmax(-1)
        return scores


def finite(value):
    return max(float(value), -9999.0)  # OpenAI's floor for impossible tokens; JSON has no -inf


# ---------------------------------------------------------------------------------------------------------------
# Backend 3: THUDM's remote code (ChatGLM-6B v1, in the legacy environment), one request at a time
# ---------------------------------------------------------------------------------------------------------------
class StreamChat:
    """model.stream_chat(tokenizer, query, history) yields the whole reply so far: it brings its own prompt
    format ("[Round N]\n问：…\n答：") and keeps history as (question, answer) pairs, with no system role."""

    def __init__(self, engine):
        self.engine, self.lock = engine, threading.Lock()

    def close(self):
        pass

    def submit(self, reply):
        threading.Thread(target=self.run, args=(reply,), daemon=True).start()

    def run(self, reply):
        engine, o, history, query = self.engine, reply.options, [], ""
        system = "".join(m["content"] for m in reply.messages if m["role"] == "system")
        for message in (m for m in reply.messages if m["role"] != "system"):
            if message["role"] == "user":
                query = message["content"]
            else:
                history.append((query, message["content"]))
                query = ""
        if system:  # no system role: it goes before the first question
            if history:
                history[0] = (f"{system}\n\n{history[0][0]}", history[0][1])
            else:
                query = f"{system}\n\n{query}"
        sampling = dict(do_sample=False, top_p=1.0, temperature=1.0) if o.greedy else dict(
            do_sample=True, top_p=o.top_p, temperature=o.temperature)
        error = None
        try:
            with self.lock:
                for text, _ in engine.model.stream_chat(engine.tokenizer, query, history,
                                                        max_length=engine.context_window,
                                                        max_new_tokens=o.max_new_tokens, **sampling):
                    if reply.cancelled.is_set():
                        break
                    reply.push_text(text, len(engine.tokenizer.encode(text, add_special_tokens=False)))
        except Exception as failure:
            error = failure
        reply.finish(error)


# ---------------------------------------------------------------------------------------------------------------
# A conversation: history, commands, printing and the Markdown transcript (both scripts' terminals)
# ---------------------------------------------------------------------------------------------------------------
HELP = """命令 Commands:
  /help             显示这段帮助 show this help
  /clear            清空对话历史 forget the conversation so far
  /save FILE        保存对话记录 write the transcript (.json: the messages; else Markdown)
  /set key=value    修改参数 change a setting: temperature, top_p, max_new_tokens, system
  /exit             退出 quit (also /quit, Ctrl-D)
  Ctrl-C            打断正在生成的回答 stop the answer being written; the chat goes on"""


@dataclass
class Chat:
    """One conversation with an engine, as a terminal shows it: "Human: question" / "model: answer"."""
    engine: ChatEngine
    options: Options = field(default_factory=Options)
    system: str = ""
    user_name: str = "用户"
    bot_name: str = ""
    out: object = None
    history: list = field(default_factory=list)  # every turn; the prompt gets what fits the window
    transcript: list = field(default_factory=list)  # (speaker, text) for the Markdown record
    label: str = ""  # what is printed before an answer (default: bot_name)
    record_questions: bool = True  # False for a second model answering the same questions (Task 8's --compare)
    about: str = ""  # the model line of the transcript (default: the engine's name)

    def __post_init__(self):
        self.bot_name = self.bot_name or self.engine.name
        self.out = self.out or sys.stdout

    def messages(self):
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def ask(self, text):
        """Streams one answer; Ctrl-C ends the answer, not the conversation. Returns the Reply (None if refused)."""
        self.history.append({"role": "user", "content": text})
        try:
            reply = self.engine.reply(self.messages(), self.options)
        except PromptError as error:
            self.history.pop()
            self.write(f"（{error}）\n")
            return None
        if self.record_questions:
            self.transcript.append((self.user_name, text))
        try:  # Ctrl-C may come at any moment from here on
            if reply.dropped:
                self.write(f"（上下文已满，最早的 {reply.dropped} 轮对话不再给模型看 "
                           f"the oldest {reply.dropped} turn(s) no longer fit the context window）\n")
            self.write(f"{self.label or self.bot_name}: ")
            for piece in reply:
                self.write(piece)
        except KeyboardInterrupt:
            self.write(" [已中断 interrupted]")
        except torch.cuda.OutOfMemoryError:
            self.write(" [显存不够 out of GPU memory：/clear，或 /set max_new_tokens=... 调小]")
        finally:
            reply.cancel()
        self.write("\n")
        self.history.append({"role": "assistant", "content": reply.text})
        self.transcript.append((self.bot_name, reply.text))
        return reply

    def write(self, text):
        self.out.write(text)
        self.out.flush()

    def handle(self, line):
        """One line typed: a command or a question. Returns False when the user wants to leave."""
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
            self.write("（对话已清空 history cleared）\n")
        elif command == "/save":
            try:
                self.write(f"（已保存到 saved to {self.save(argument)}）\n" if argument else "用法 usage：/save FILE\n")
            except UserError as error:  # a transcript that cannot be written: said in one sentence, the chat goes on
                self.write(f"{error}\n")
        elif command == "/set":
            self.write(self.set(argument) + "\n")
        else:
            self.write(f"不认识的命令 unknown command {command}：/help\n")
        return True

    def set(self, assignment):
        key, sep, value = assignment.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        try:
            if key == "system" and sep:
                self.system = value
            elif key == "temperature" and float(value) >= 0:
                self.options.temperature = float(value)
            elif key == "top_p" and 0 < float(value) <= 1:
                self.options.top_p = float(value)
            elif key == "max_new_tokens" and int(value) >= 1:
                self.options.max_new_tokens = int(value)
            else:
                raise ValueError
        except ValueError:
            o = self.options
            now = dict(temperature=o.temperature, top_p=o.top_p, max_new_tokens=o.max_new_tokens, system=self.system)
            return (f"用法 usage：/set key=value，可设 temperature（≥0）、top_p（0~1]、max_new_tokens（≥1）、system；"
                    f"当前 now：{json.dumps(now, ensure_ascii=False)}")
        return f"（{key} = {value}）"

    def save(self, filename, title=None):
        """.json: the message list; anything else: the Markdown transcript. Written atomically."""
        path = Path(filename)
        text = (json.dumps(self.messages(), ensure_ascii=False, indent=2) if path.suffix == ".json"
                else self.markdown(title))
        try:
            with atomic_path(path) as tmp:
                Path(tmp).write_text(text, encoding="utf-8")
        except OSError as error:
            raise UserError(f"无法写入 cannot write {path}（{error.strerror or error}）：换一个文件名或目录") from None
        return path

    def markdown(self, title=None):
        """The record a student hands in."""
        o = self.options
        lines = [f"# {title or 'Chat with ' + self.engine.name}", "", f"- model: {self.about or self.engine.name}",
                 f"- time: {datetime.now():%Y-%m-%d %H:%M}",
                 f"- temperature {o.temperature}, top-p {o.top_p}, repetition penalty {o.repetition_penalty}, "
                 f"max new tokens {o.max_new_tokens}, seed {o.seed}"]
        if self.system:
            lines.append(f"- system prompt: {self.system}")
        lines.append("")
        for speaker, text in self.transcript:
            lines += [f"**{speaker}:** {text}", ""]
        return "\n".join(lines)


def user_lines(asks, prompt="> "):
    """Where the user's turns come from: --ask texts, a person at a terminal, or lines of a pipe.
    Yields (line, typed): typed lines are not echoed again."""
    if asks:
        for text in asks:
            yield text, False
    elif sys.stdin is not None and (sys.stdin.isatty() or "ipykernel" in sys.modules):
        try:
            import readline  # noqa: F401  (arrow keys and line editing where available)
        except ImportError:
            pass
        while True:
            try:
                yield input(prompt), True
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt ends the chat
                print()
                return
    elif sys.stdin is not None:  # a pipe or a file: never a prompt that waits
        for line in sys.stdin:
            if line.strip():
                yield line.rstrip("\n"), False


def run_terminal(chat, asks=()):
    """The terminal front end of both scripts. Returns how many lines came in."""
    count = 0
    for line, typed in user_lines(asks, f"\n{chat.user_name}> "):
        count += 1
        if not typed and not line.strip().startswith("/"):
            chat.write(f"{chat.user_name}: {line.strip()}\n")
        if not chat.handle(line):
            break
    return count
