"""The web chat UI in a real headless browser: Debian's chromium + chromedriver driven by Selenium.

The server runs in-process on 127.0.0.1 with a scripted model (serve_helpers.ScriptModel: its replies
are forced, so the page can be checked against known Markdown, a python tool call, and hostile HTML).
The test loads the page, sends messages, watches the reply stream in, stops one, starts a new chat,
and saves a screenshot (to $CHATFORGE_TEST_ARTIFACTS, else pytest's temporary folder)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from chatforge.config import ServeConfig
from chatforge.engine import Engine
from chatforge.serve import create_app
from engine_helpers import train_tokenizer
from serve_helpers import ScriptModel, serve

pytestmark = pytest.mark.slow
MODEL = "scripted-ui"
MARKDOWN = ("# Title\nSome **bold** and `code` here.\n\n- one\n- two\n\n```python\nprint('hi')\n```\n"
            "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script> "
            "[bad](javascript:alert(1)) [good](https://example.com/x)\n\nLet me compute.")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromedriver are needed (apt-get install chromium chromium-driver; .ci/run does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--window-size=1100,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    b = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    b.set_page_load_timeout(30)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def app_and_model():
    tok = train_tokenizer(512)
    sp, enc = tok.special, tok.encode
    end = sp("<|assistant_end|>")
    book = {
        "markdown": enc(MARKDOWN) + [sp("<|python_start|>")] + enc("print(6*7)") + [sp("<|python_end|>")]
        + enc("Done.") + [end],
        "forever": enc("la"),
    }
    hello = enc("Hello there.") + [end]

    def choose(prompt):
        text = tok.decode(prompt)
        user = text[text.rfind("<|user_start|>"):]
        model.delay = 0.02 if "forever" in user else 0.01  # slow enough to watch the reply stream in
        return next((s for k, s in book.items() if k in user), hello)

    model = ScriptModel(tok.vocab_size, sp("<|output_start|>"), sp("<|output_end|>"), choose, max_seq_len=2048)
    engine = Engine(model, tok, tools=None)
    app = create_app(engine, ServeConfig(checkpoint="unused", max_tokens=300), model_name=MODEL)
    return app, model, tok


def wait(cond, timeout=30.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_in_a_real_browser(browser, app_and_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, model, tok = app_and_model
    sched = app.state.server.scheduler
    find = browser.find_element
    with serve(app) as url:
        browser.get(url + "/")
        wait(lambda: MODEL in find(By.ID, "model").text, what="the model name from /v1/models")
        # record what the page sends, to check the settings are used
        browser.execute_script("window.sent = []; const f = window.fetch; window.fetch = (u, o) => "
                               "{ if (o && o.body) window.sent.push(o.body); return f(u, o); };")
        t = find(By.ID, "temperature")
        t.clear()
        t.send_keys("0.3")

        def send(text):
            n = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
            box = find(By.ID, "input")
            box.send_keys(text)
            box.send_keys(Keys.ENTER)
            return wait(lambda: (browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n:] or [None])[0],
                        what="the reply bubble")

        # 1. a streamed reply with Markdown, a tool call and hostile HTML
        reply = send("show markdown please")
        seen = set()
        while reply.get_attribute("data-state") == "streaming":
            seen.add(len(reply.find_element(By.CLASS_NAME, "body").text))
            time.sleep(0.01)
        assert reply.get_attribute("data-state") == "done" and reply.get_attribute("data-finish") == "stop"
        assert len(seen - {0}) >= 2, "the reply should appear piece by piece"
        assert int(reply.get_attribute("data-chunks")) > 5
        body = reply.find_element(By.CLASS_NAME, "body")
        assert body.find_element(By.TAG_NAME, "h3").text == "Title"
        assert body.find_element(By.TAG_NAME, "strong").text == "bold"
        assert [li.text for li in body.find_elements(By.TAG_NAME, "li")] == ["one", "two"]
        code = body.find_element(By.CSS_SELECTOR, "pre > code.language-python")
        assert code.text == "print('hi')"
        call = body.find_element(By.CSS_SELECTOR, ".tool.call")
        assert "python call" in call.text and "print(6*7)" in call.text
        assert "42" in body.find_element(By.CSS_SELECTOR, ".tool.output").text
        assert body.text.rstrip().endswith("Done.")
        # model output is text, never markup: no element was created from it, the title is untouched
        messages = find(By.ID, "messages")
        assert messages.find_elements(By.TAG_NAME, "img") == [] and messages.find_elements(By.TAG_NAME, "script") == []
        assert "<img src=x onerror=" in body.text and "<script>" in body.text
        assert browser.title == "chatforge"
        links = body.find_elements(By.TAG_NAME, "a")
        assert [(a.text, a.get_attribute("href")) for a in links] == [("good", "https://example.com/x")]
        assert links[0].get_attribute("rel") == "noopener noreferrer nofollow"
        assert json.loads(browser.execute_script("return window.sent[0]"))["temperature"] == 0.3

        artifacts = Path(os.environ.get("CHATFORGE_TEST_ARTIFACTS") or tmp_path)
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / "serve_chat_ui.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")

        # 2. multi-turn: the page sends the first reply back in the native form (tool call included)
        second = send("hello")
        wait(lambda: second.get_attribute("data-state") == "done", what="the second reply")
        assert second.find_element(By.CLASS_NAME, "body").text == "Hello there."
        native = [{"role": "assistant", "content": MARKDOWN,
                   "tool_calls": [{"name": "python", "arguments": "print(6*7)"}]},
                  {"role": "tool", "name": "python", "content": "42\n"},
                  {"role": "assistant", "content": "Done."}]
        assert model.prompts[-1] == tok.render_prompt([{"role": "user", "content": "show markdown please"}, *native,
                                                       {"role": "user", "content": "hello"}])

        # 3. the stop button ends a reply and the server stops generating it
        cancelled = sched.stats.cancelled
        long = send("go on forever")
        wait(lambda: int(long.get_attribute("data-chunks")) > 3, what="the long reply to start")
        find(By.ID, "stop").click()
        wait(lambda: long.get_attribute("data-state") == "stopped", what="the reply to stop")
        assert "(stopped)" in long.text
        wait(lambda: sched.stats.cancelled == cancelled + 1 and sched.stats.running == 0, timeout=5,
             what="the server to cancel the request")

        # 4. new chat: the page forgets the conversation
        find(By.ID, "new-chat").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
        third = send("hello again")
        wait(lambda: third.get_attribute("data-state") == "done", what="the reply in the new chat")
        assert model.prompts[-1] == tok.render_prompt([{"role": "user", "content": "hello again"}])
