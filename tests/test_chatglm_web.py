"""Task 0 (ChatGLM.py --web): the Gradio page in headless Chromium (Debian's, driven by Playwright).

Type a message, send it, and read the streamed answer from the page; it must be what greedy model.generate
says. The tiny model's vocabulary has no Markdown characters, so the rendered text equals the raw text (up to
white space). The user's own message shows that Markdown and LaTeX are rendered.
"""
import socket
import time
from contextlib import nullcontext

import pytest
from test_chatglm import engine, reference, tiny_dir  # noqa: F401  (session fixtures)

import chat_engine
import ChatGLM

CHROMIUM = "/usr/bin/chromium"


def squash(text):
    return " ".join(text.split())


@pytest.fixture(scope="module")
def page_url(engine):  # noqa: F811
    settings = ChatGLM.Options(max_new_tokens=24, temperature=0, top_p=1.0)
    demo = ChatGLM.build_web_app(engine, settings)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


def test_chat_page_streams_the_answer(browser, page_url, engine, monkeypatch):  # noqa: F811
    # A real model takes tens of milliseconds per token; the tiny one is so quick that the browser may get the
    # whole answer in one update. Pace its tokens like a small real model so that streaming can be seen.
    push = chat_engine.Reply.push
    monkeypatch.setattr(chat_engine.Reply, "push", lambda self, *a: (time.sleep(0.02), push(self, *a))[1])
    page = browser.new_page()
    page.goto(page_url)
    page.locator("#message textarea").wait_for(timeout=30000)
    # what the page shows while the answer grows, sampled by the page itself (the answer takes well under a second)
    page.evaluate("""() => { window.seen = new Set();
        new MutationObserver(() => { const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
            if (bots.length) window.seen.add(bots[bots.length - 1].innerText); })
          .observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true}); }""")
    question = "**粗体** $x^2$ 你好"
    messages = [{"role": "user", "content": question}]
    # Both turns' references first, while the engine is idle: plain generate() must not run on the model while
    # the engine's own loop generates with it (continuous batching switches the model to its paged attention).
    with engine.paged.pause() if engine.paged else nullcontext(), chat_engine.paged_attention_off(engine.model):
        first = reference(engine, messages, 24)[0]
        history = messages + [{"role": "assistant", "content": first}, {"role": "user", "content": "hello world"}]
        expected, expected2 = squash(first), squash(reference(engine, history, 24)[0])
    page.locator("#message textarea").fill(question)
    page.locator("#send").click()

    bot = page.locator('#chatbot [data-testid="bot"]').last
    deadline = time.time() + 60
    while time.time() < deadline and squash(bot.inner_text() if bot.count() else "") != expected:
        time.sleep(0.2)
    assert squash(bot.inner_text()) == expected
    assert page.locator("#message textarea").input_value() == ""
    # the user's message is rendered: Markdown bold and KaTeX
    user = page.locator('#chatbot [data-testid="user"]').last
    assert user.locator("strong").inner_text() == "粗体"
    assert user.locator(".katex").count() >= 1
    seen = [squash(text) for text in page.evaluate("() => Array.from(window.seen)")]
    assert any(text and text != expected and expected.startswith(text) for text in seen), \
        "the answer should appear piece by piece"

    # a second turn, sent with Enter, sees the first one
    page.locator("#message textarea").fill("hello world")
    page.locator("#message textarea").press("Enter")
    deadline = time.time() + 60
    answers = page.locator('#chatbot [data-testid="bot"]')
    while time.time() < deadline and squash(answers.nth(1).inner_text() if answers.count() > 1 else "") != expected2:
        time.sleep(0.2)
    assert squash(page.locator('#chatbot [data-testid="bot"]').nth(1).inner_text()) == expected2

    # three sliders (temperature, top_p, max_new_tokens), and a clear button that empties the chat
    assert page.locator('input[type="range"]').count() == 3
    page.locator("#clear").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')", timeout=10000)
    page.close()


def test_several_pages_are_answered_at_once(engine):  # noqa: F811
    """Gradio runs one event of a kind at a time unless told otherwise; the answers must share the engine's batches."""
    demo = ChatGLM.build_web_app(engine, ChatGLM.Options())
    limits = [f.concurrency_limit for f in demo.fns.values() if f.name == "stream_answer"]
    assert len(limits) == 2 and all(limit == ChatGLM.MAX_CONCURRENT > 1 for limit in limits)
