"""The API's documentation pages in a real browser with the network cut off: /docs (Swagger UI)
and /redoc must render the operations from scripts and styles the server itself sends, and no
request may leave 127.0.0.1 (a user behind a firewall, or on a plane, gets the same page)."""

from __future__ import annotations

import io
from urllib.parse import urlsplit

import pytest
from PIL import Image
from playwright.sync_api import expect

from tests.serve.test_pages_browser import browser, serve  # noqa: F401 (browser is a fixture)
from tests.tiny import real_tokenizer, tiny_llama

LOCAL_HOSTS = {"127.0.0.1", "localhost"}
# Swagger UI's colour for POST operations (its stylesheet's `.opblock-post .opblock-summary-method`):
# seen in the screenshot only when swagger-ui.css loaded and the operations were drawn.
SWAGGER_POST_GREEN = (0x49, 0xCC, 0x90)
# ReDoc's "API docs by Redocly" footer links its logo from Redocly's CDN. The page's
# Content-Security-Policy stops it in the browser (so it never reaches the network) and says so
# in the console; that one message is expected, any other is a failure.
REDOC_LOGO_BLOCKED = "Loading the image 'https://cdn.redoc.ly/redoc/logo-mini.svg' violates"


@pytest.fixture(scope="module")
def base():
    with serve(tiny_llama(len(real_tokenizer()))) as url:
        yield url


@pytest.fixture
def offline_page(browser):  # noqa: F811
    """A page whose requests to any host but this machine are aborted, and recorded in ``page.left``."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.left, page.problems = [], []

    def only_local(route) -> None:
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            page.left.append(url)
            route.abort("internetdisconnected")

    context.route("**/*", only_local)
    page.on("pageerror", lambda exc: page.problems.append(f"JavaScript error: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and page.problems.append(f"console: {msg.text}"))
    yield page
    context.close()


def colours(png: bytes) -> set[tuple[int, int, int]]:
    return {colour for _, colour in Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 24)}


def near(colour: tuple[int, int, int], seen: set[tuple[int, int, int]], tolerance: int = 6) -> bool:
    return any(all(abs(a - b) <= tolerance for a, b in zip(colour, other, strict=True)) for other in seen)


def open_offline(page, url: str) -> None:
    page.goto(url, wait_until="networkidle")
    assert not page.left, f"{url} asked hosts other than this machine for: {page.left}"


def test_swagger_ui_renders_the_operations_offline(offline_page, base):
    page = offline_page
    open_offline(page, f"{base}/docs")
    operation = page.locator('.opblock-post .opblock-summary-path[data-path="/v1/chat/completions"]')
    expect(operation).to_be_visible(timeout=30_000)
    expect(page.locator('.opblock-summary-path[data-path="/v1/completions"]')).to_be_visible()
    expect(page.locator('.opblock-get .opblock-summary-path[data-path="/v1/models"]')).to_be_visible()

    # Opening an operation shows its documented answers, the 404 among them.
    operation.click()
    expect(page.locator('.opblock-post.is-open tr.response[data-code="404"]').first).to_be_visible()
    shot = colours(page.screenshot(full_page=False))
    assert len(shot) > 16, f"the screenshot has {len(shot)} colours: the page is blank"
    assert near(SWAGGER_POST_GREEN, shot), "no POST badge in the screenshot: swagger-ui.css did not apply"
    assert not page.left, f"the page asked other hosts for: {page.left}"
    assert not page.problems, page.problems


def test_redoc_renders_the_operations_offline(offline_page, base):
    page = offline_page
    open_offline(page, f"{base}/redoc")
    section = page.locator('[data-section-id^="operation/"]').filter(has_text="/v1/chat/completions").first
    expect(section).to_be_attached(timeout=30_000)
    section.scroll_into_view_if_needed()
    expect(section.locator("h2")).to_have_text("Chat Completions")
    expect(section.locator("h2")).to_be_visible()
    expect(section).to_contain_text("404")  # the documented answers, the 404 among them
    blank = page.context.new_page()
    blank.set_content("<body></body>")
    assert len(colours(blank.screenshot())) == 1  # the comparison below means something
    blank.close()
    shot = colours(page.screenshot(full_page=False))
    assert len(shot) > 16, f"the screenshot has {len(shot)} colours: the page is blank"
    assert not page.left, f"the page asked other hosts for: {page.left}"
    assert [p for p in page.problems if REDOC_LOGO_BLOCKED not in p] == [], page.problems
