"""The web chat page in a real browser: headless Debian chromium driven by Playwright (its own browser download
is never used). The page loads, a message is sent, the streamed reply appears, a screenshot is saved as an
artifact ($LLMKIT_TEST_ARTIFACTS, else the test's tmp dir), and markup in messages and replies is shown as
text and runs nothing."""

import os
import shutil
import time
from pathlib import Path

import pytest

from test_serve import checkpoint, start  # noqa: F401  (checkpoint is a fixture)

XSS = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'


def chromium_or_skip() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it when it can)"
        print(f"SKIP browser test: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def browser():
    executable = chromium_or_skip()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(checkpoint, browser):  # noqa: F811
    # 5 ms an engine step: slow enough to press Stop in the middle of a reply
    url, thread, server = start(checkpoint, engine_step_delay=0.005, max_tokens=200)
    tab = browser.new_page(viewport={"width": 1100, "height": 700})
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(url + "/")
    tab.wait_for_selector("#model-status:has-text('model: tiny')", timeout=15_000)
    tab.server = server
    yield tab
    assert errors == []  # no script error on the page the whole time
    tab.close()
    thread.stop()
    server.engine.close()


def artifact_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("LLMKIT_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def send(page, text: str) -> None:
    page.locator("#temperature").fill("0")  # greedy: the same reply every run
    before = page.locator(".message.assistant[data-done='true']").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_selector(f".message.assistant[data-done='true'] >> nth={before}", timeout=30_000)


def test_page_streams_a_reply_and_saves_a_screenshot(page, tmp_path):
    page.fill("#system-prompt", "You are terse.")
    page.locator("#max-tokens").fill("24")  # a range input: sets the value and fires `input`
    assert page.inner_text("#max-tokens-value") == "24"
    send(page, "Good morrow, what news?")
    assert page.locator(".message.user").last.inner_text() == "Good morrow, what news?"
    reply = page.locator(".message.assistant").last
    assert reply.inner_text().strip()  # the streamed reply appeared
    assert page.locator(".message.error").count() == 0
    shot = artifact_dir(tmp_path) / "serve_chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 1000


def test_markup_in_a_message_is_text_and_runs_nothing(page):
    send(page, XSS)
    assert page.locator(".message.user").last.inner_text() == XSS
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_markdown_renders_code_and_never_raw_html(page):
    reply = "# Title\n**bold** and `code` and [site](https://example.com) [bad](javascript:alert(1))\n" \
            "- one\n- two\n\n```python\nprint('<b>hi</b>')\n```\n" + XSS
    html = page.evaluate("""text => {
        const box = document.createElement('div');
        box.className = 'message assistant';
        box.appendChild(window.llmkitChat.renderMarkdown(text));
        document.getElementById('messages').appendChild(box);
        return box.innerHTML;
    }""", reply)
    page.wait_for_timeout(200)  # time for an injected onerror to fire, were there one
    assert page.evaluate("window.__pwned") is None
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and "<h3>Title</h3>" in html
    assert '<a href="https://example.com/"' in html and 'href="javascript' not in html
    assert "<li>one</li><li>two</li>" in html
    assert '<pre><code class="language-python">print(\'&lt;b&gt;hi&lt;/b&gt;\')</code></pre>' in html
    assert "&lt;img src=x onerror=" in html and "<img" not in html and "<script" not in html


def test_reset_clears_the_conversation(page):
    send(page, "hello")
    assert page.locator(".message").count() > 0
    page.click("#reset")
    assert page.locator(".message").count() == 0


def eventually(condition, tries: int = 400) -> None:
    """Poll from Python: the page's CSP forbids the string evaluation wait_for_function needs."""
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.025)
    raise AssertionError("timed out")


def test_stop_cancels_the_reply_on_the_server(page):
    metrics, engine = page.server.metrics, page.server.engine
    cancelled = metrics.finished.get("cancelled", 0)
    page.locator("#max-tokens").fill("200")
    page.fill("#input", "Speak on, and at length.")
    page.press("#input", "Enter")
    eventually(lambda: page.locator(".message.assistant").last.inner_text().strip() != "")
    page.click("#stop")
    page.wait_for_selector(".message.assistant:last-child[data-done='true']", timeout=10_000)
    assert page.locator("#send").is_enabled()
    eventually(lambda: metrics.finished.get("cancelled", 0) == cancelled + 1 and engine.stats().running == 0)


def test_page_works_with_an_api_key(checkpoint, browser):  # noqa: F811
    url, thread, server = start(checkpoint, api_keys=("sk-page-key",), max_tokens=32)
    tab = browser.new_page()
    try:
        tab.goto(url + "/")  # the page itself needs no key; the API does
        tab.wait_for_selector("#model-status.error:has-text('401')", timeout=15_000)
        tab.fill("#api-key", "sk-page-key")
        tab.dispatch_event("#api-key", "change")
        tab.wait_for_selector("#model-status:has-text('model: tiny')", timeout=15_000)
        tab.locator("#max-tokens").fill("8")
        send(tab, "hello")
        assert tab.locator(".message.error").count() == 0 and tab.locator(".message.assistant").last.inner_text()
    finally:
        tab.close()
        thread.stop()
        server.engine.close()
