"""The chat page in headless Chromium (Playwright driving Debian's chromium) against the real Serve app: type a
message and watch the reply stream in, change the temperature, start a new conversation, see an error shown.
A screenshot is saved under the test's output directory ($NANOCHAT_TEST_OUTPUT, else pytest's tmp_path)."""
import importlib.util
import json
import os
import shutil

import pytest

from test_serve import API_KEY, shared_app, shutdown_shared_app

CHROMIUM = os.environ.get("NANOCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HAVE_CHROMIUM = bool(os.path.exists(CHROMIUM) or shutil.which(CHROMIUM))
HAVE_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
UI_READY = HAVE_CHROMIUM and HAVE_PLAYWRIGHT  # test_serve leaves its app running for us only then

pytestmark = [
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"chromium not found at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.skipif(not HAVE_PLAYWRIGHT, reason="playwright not installed (pip install playwright)"),
]


@pytest.fixture(scope="module", autouse=True)
def _shutdown_serve():
    yield
    shutdown_shared_app()


@pytest.fixture
def url(ray_local, tiny_tokenizer, tmp_path_factory):
    """test_serve's app (with an API key), started here when that module did not run first."""
    return shared_app(tiny_tokenizer, tmp_path_factory)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1000, "height": 700})
        finally:
            browser.close()


def test_chat_page(url, page, tmp_path):
    sent = []  # bodies of the page's POST /chat requests
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat") else None)
    asked = []  # the server wants a key: the page asks for it once, and keeps it for the tab
    page.on("dialog", lambda d: (asked.append(d.message), d.accept(API_KEY)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('ready')", timeout=30_000)

    # a long reply: its text shows up while it is still streaming, and keeps growing; Stop ends it early
    page.fill("#max-tokens", "1000")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    streaming = "document.querySelector('.msg.assistant.streaming')"
    page.wait_for_function(f"{streaming} && {streaming}.textContent.length > 0", timeout=30_000)
    seen = page.evaluate(f"{streaming}.textContent.length")
    page.wait_for_function(f"{streaming} && {streaming}.textContent.length > {seen}", timeout=30_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=30_000)
    assert page.inner_text(".msg.user") == "Hello there"
    assert page.inner_text(".msg.assistant") and not page.is_visible("#error")
    assert sent[-1]["messages"] == [{"role": "user", "content": "Hello there"}] and sent[-1]["stream"] is True
    assert sent[-1]["max_tokens"] == 1000 and sent[-1]["temperature"] == 0.8
    page.fill("#max-tokens", "20")

    # a second turn carries the whole conversation
    page.fill("#input", "And then?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming)').length == 2",
                           timeout=30_000)
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert asked == ["This server needs an API key:"]
    page.reload()  # the key outlives a reload of the tab
    page.wait_for_function("document.getElementById('status').textContent.includes('ready')", timeout=30_000)

    # temperature 0 (slider): two new conversations with the same message get the same reply
    page.focus("#temperature")
    page.keyboard.press("Home")  # slider to its minimum, as a keyboard user would
    assert page.inner_text("#temperature-value") == "0"
    replies = []
    for _ in range(2):
        page.click("#new")
        assert page.locator(".msg").count() == 0
        page.fill("#input", "Hello there")
        page.click("#send")
        page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=30_000)
        replies.append(page.inner_text(".msg.assistant"))
        assert sent[-1]["temperature"] == 0 and len(sent[-1]["messages"]) == 1
    assert replies[0] == replies[1] and len(asked) == 1
    out_dir = os.environ.get("NANOCHAT_TEST_OUTPUT", str(tmp_path))
    os.makedirs(out_dir, exist_ok=True)
    page.screenshot(path=os.path.join(out_dir, "web_ui.png"))

    # a request the server refuses: the error is shown and the message comes back for editing
    page.fill("#max-tokens", "99999")
    page.fill("#input", "too long an answer")
    page.press("#input", "Enter")
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    assert "max_tokens must be between 1 and 4096" in page.inner_text("#error")
    assert page.input_value("#input") == "too long an answer"
    assert page.locator(".msg").count() == 2  # the failed turn was taken back
    page.screenshot(path=os.path.join(out_dir, "web_ui_error.png"))
