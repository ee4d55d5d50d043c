"""Task 0 (ChatGLM.py --api): the OpenAI-compatible server, driven by the official `openai` client.

The server runs in a background thread on a free 127.0.0.1 port, over the tiny random chat model of
test_chatglm.py. Answers are checked against plain greedy model.generate on the same conversation, and every
request field is either honoured (checked against the engine or the model) or refused with a 400 naming it.
"""
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from test_chatglm import STRICT_TEMPLATE, engine, reference, tiny_dir  # noqa: F401  (session fixtures)

import chat_engine
import ChatGLM

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "你好"}]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine):  # noqa: F811
    settings = ChatGLM.Options(max_new_tokens=12, temperature=0, top_p=1.0)
    app = ChatGLM.build_api_app(engine, settings, "tiny-chat", api_key=KEY)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started, "the API server did not start"
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


def test_completion_equals_model_generate(client, engine):  # noqa: F811
    messages = [{"role": "system", "content": "你是一个语言模型"}, {"role": "user", "content": "今天天气很好"}]
    result = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20, temperature=0)
    text, new_ids, prompt_ids = reference(engine, messages, 20)
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("stop" if new_ids[-1] == engine.tokenizer.eos_token_id else "length")
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == len(new_ids)
    assert result.usage.total_tokens == len(prompt_ids) + len(new_ids)
    assert result.object == "chat.completion" and result.model == "tiny-chat"


def test_streaming_chunks(client, engine):  # noqa: F811
    stream = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text, new_ids, prompt_ids = reference(engine, HELLO, 20)
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(contents) > 1 and "".join(contents) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if new_ids[-1] != engine.tokenizer.eos_token_id else "stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == len(prompt_ids)
    assert usage.completion_tokens == len(new_ids)
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_format(server):
    body = {"model": "tiny-chat", "messages": HELLO, "stream": True, "max_tokens": 5}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] == "length"
    assert "usage" not in last  # only with stream_options.include_usage


def test_stop_strings(client, engine):  # noqa: F811
    full, _, _ = reference(engine, HELLO, 30)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = full[:full.index(stop)]
    result = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=30, temperature=0,
                                            stop=[stop, "never"])
    assert result.choices[0].message.content == expected and result.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=30, temperature=0,
                                            stop=stop, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": HELLO, "temperature": 5}, "temperature"),
    ({"model": "m", "messages": HELLO, "top_p": "high"}, "top_p"),
    ({"model": "m", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": HELLO, "n": 99}, "n"),
    ({"model": "m", "messages": HELLO, "seed": "x"}, "seed"),
    ({"model": "m", "messages": HELLO, "top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"model": "m", "messages": HELLO, "logit_bias": {"abc": 5}}, "logit_bias"),
    ({"model": "m", "messages": HELLO, "presence_penalty": 3}, "presence_penalty"),
    ({"model": "m", "messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"model": "m", "messages": HELLO, "response_format": {"type": "json_object"}}, "response_format.type"),
    ({"model": "m", "messages": HELLO, "user": "someone"}, "user"),
    ({"model": "m", "messages": HELLO, "no_such_field": 1}, "no_such_field"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "x"}]}, "messages[0].name"),
    ({"model": "m", "messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ({"model": "m", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "今天天气很好 " * 300}]}, "messages"),
])
def test_bad_requests_get_a_clear_400_and_the_server_goes_on(server, client, body, param):
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert client.chat.completions.create(model="m", messages=HELLO, max_tokens=3).choices[0].message.content


def test_bad_requests_through_the_client(server, client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="m", messages=HELLO, temperature=5)
    assert error.value.status_code == 400 and "temperature" in str(error.value)
    response = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_messages_the_chat_template_rejects_get_a_400(server, client, engine, monkeypatch):  # noqa: F811
    monkeypatch.setattr(engine.tokenizer, "chat_template", STRICT_TEMPLATE)  # roles must alternate
    body = {"model": "m", "messages": [{"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}]}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "alternate" in error["message"]
    assert client.chat.completions.create(model="m", messages=HELLO, max_tokens=3).choices[0].message.content


def test_api_key_is_required(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="m", messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    response = httpx.get(f"{server}/v1/models", timeout=10)  # no key at all
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_concurrent_requests_are_batched_and_each_gets_its_answer(client, engine, monkeypatch):  # noqa: F811
    questions = ["你好", "hello world", "今天天气很好", "我们一起学习", "the quick brown fox", "你好 世界"]
    results, errors = {}, []
    most, submit = [0], chat_engine.Paged.submit

    def counting_submit(self, reply):  # how many requests the scheduler holds at once
        submit(self, reply)
        most[0] = max(most[0], len(self.replies))

    monkeypatch.setattr(chat_engine.Paged, "submit", counting_submit)
    push = chat_engine.Reply.push  # tokens come at a small real model's pace, so that requests overlap
    monkeypatch.setattr(chat_engine.Reply, "push", lambda self, *a: (time.sleep(0.01), push(self, *a))[1])

    def ask(i, question):
        try:
            messages = [{"role": "user", "content": question}]
            if i % 2:
                stream = client.chat.completions.create(model="m", messages=messages, max_tokens=16,
                                                        temperature=0, stream=True)
                results[i] = "".join(c.choices[0].delta.content or "" for c in stream)
            else:
                results[i] = client.chat.completions.create(model="m", messages=messages, max_tokens=16,
                                                            temperature=0).choices[0].message.content
        except Exception as error:  # collected: an exception in a thread would not fail the test
            errors.append(error)

    threads = [threading.Thread(target=ask, args=item) for item in enumerate(questions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and most[0] > 1, "the requests should have run together"
    for i, question in enumerate(questions):
        assert results[i] == reference(engine, [{"role": "user", "content": question}], 16)[0]


def test_a_client_that_hangs_up_stops_its_generation(server, client, engine, monkeypatch):  # noqa: F811
    expected = reference(engine, HELLO, 4)[0]
    replies, make = [], engine.reply
    monkeypatch.setattr(engine, "reply", lambda *a, **k: replies.append(make(*a, **k)) or replies[-1])
    push = chat_engine.Reply.push  # paced, so that 240 tokens take seconds
    monkeypatch.setattr(chat_engine.Reply, "push", lambda self, *a: (time.sleep(0.02), push(self, *a))[1])
    body = {"model": "m", "messages": HELLO, "stream": True, "max_tokens": 240, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        next(events), next(events)  # the role, then the first piece: generation has started; now hang up
    deadline = time.time() + 10
    while not replies[0].cancelled.is_set() and time.time() < deadline:
        time.sleep(0.05)
    assert replies[0].cancelled.is_set() and replies[0].finish_reason == "interrupted"
    assert not engine.paged.replies, "the scheduler must drop the request of a client that left"
    result = client.chat.completions.create(model="m", messages=HELLO, max_tokens=4, temperature=0)
    assert result.choices[0].message.content == expected


def test_n_seed_and_sampling(client, engine):  # noqa: F811
    two = client.chat.completions.create(model="m", messages=HELLO, max_tokens=8, temperature=0, n=2)
    greedy = reference(engine, HELLO, 8)[0]
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content == greedy for c in two.choices)
    sample = lambda seed, n=1: client.chat.completions.create(model="m", messages=HELLO, max_tokens=16, n=n,
                                                              temperature=1.5, top_p=1.0, seed=seed)
    first, again, other = sample(5), sample(5), sample(6)
    assert first.choices[0].message.content == again.choices[0].message.content  # the seed is honoured
    assert first.choices[0].message.content != other.choices[0].message.content
    expected = "".join(engine.reply(HELLO, max_new_tokens=16, temperature=1.5, top_p=1.0, seed=5))
    assert first.choices[0].message.content == expected
    pair = sample(5, n=2)  # n samples with a seed: choice i uses seed + i, so they differ, reproducibly
    assert pair.choices[0].message.content == expected != pair.choices[1].message.content
    assert pair.usage.completion_tokens > first.usage.completion_tokens


def test_penalties_logit_bias_and_logprobs(client, engine):  # noqa: F811
    text, new_ids, prompt_ids = reference(engine, HELLO, 10)
    asked = dict(presence_penalty=1.5, frequency_penalty=2.0)
    result = client.chat.completions.create(model="m", messages=HELLO, max_tokens=10, temperature=0, **asked)
    assert result.choices[0].message.content == "".join(engine.reply(HELLO, max_new_tokens=10, temperature=0, **asked))
    banned = client.chat.completions.create(model="m", messages=HELLO, max_tokens=10, temperature=0,
                                            logit_bias={str(new_ids[0]): -100})
    assert banned.choices[0].message.content != text  # the greedy first token can no longer be chosen
    result = client.chat.completions.create(model="m", messages=HELLO, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert result.choices[0].message.content == text and len(content) == len(new_ids)
    with torch.no_grad():
        logp = engine.model(torch.tensor([prompt_ids + new_ids])).logits[0].log_softmax(-1)
    for k, (token_id, entry) in enumerate(zip(new_ids, content)):
        assert entry.logprob == pytest.approx(logp[len(prompt_ids) + k - 1, token_id].item(), abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    stream = client.chat.completions.create(model="m", messages=HELLO, max_tokens=10, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content])
