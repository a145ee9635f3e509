"""The web pages in a real browser (Playwright driving Debian's Chromium, headless): rank two
prompts on /rank, one by dragging and one by keyboard, export, train a reward model on the
export and check it agrees with the person; and chat on /chat, seeing the answer stream in."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from instructkit.serve.labels import export_rankings, write_store
from tests.browser import ARGS as CHROMIUM_ARGS
from tests.browser import CHROMIUM
from tests.tiny import real_tokenizer, tiny_llama, tiny_model_dir

# Two prompts, three responses each, stored in an order the person does not agree with. The
# person's ranking, best first; on the second prompt the last two are tied.
PROMPTS = [[{"role": "user", "content": "reverse: red blue"}], [{"role": "user", "content": "reverse: sun moon tree"}]]
RESPONSES = [["red blue wrong", "blue red", "red blue"], ["sun moon tree wrong", "moon sun", "tree moon sun"]]
BEST_FIRST = [["blue red", "red blue", "red blue wrong"], ["tree moon sun", "moon sun", "sun moon tree wrong"]]
TIED = [[False, False, False], [False, False, True]]


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.is_file(), f"no Chromium at {CHROMIUM}: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` on a free local port in a thread, for the duration of a with-block."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return f"http://127.0.0.1:{self.port}"
            assert self.thread.is_alive(), "the server stopped while starting"
            time.sleep(0.05)
        raise AssertionError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(model, **kwargs) -> LiveServer:
    from instructkit.serve import create_app

    return LiveServer(create_app(model, real_tokenizer(), "tiny", **kwargs))


# ----------------------------------------------------------------------------------------------
# Ranking


def shown_texts(page: Page) -> list[str]:
    return page.locator("#responses > li .text").evaluate_all("els => els.map(e => e.textContent)")


def item(page: Page, text: str):
    return page.locator("#responses > li").filter(has=page.locator(f'.text:text-is("{text}")'))


def order_by_dragging(page: Page, best_first: list[str]) -> None:
    for position, text in enumerate(best_first):
        if shown_texts(page)[position] != text:
            target = page.locator("#responses > li").nth(position)
            item(page, text).drag_to(target, target_position={"x": 30, "y": 3})  # its top edge: land above it
        assert shown_texts(page)[position] == text


def order_by_keyboard(page: Page, best_first: list[str], tied: list[bool]) -> None:
    for position, text in enumerate(best_first):
        current = shown_texts(page).index(text)
        item(page, text).focus()
        for _ in range(current - position):
            page.keyboard.press("Shift+ArrowUp")
        assert shown_texts(page)[position] == text
    for position, tie in enumerate(tied):
        if tie:
            page.locator("#responses > li").nth(0).focus()
            for _ in range(position):
                page.keyboard.press("ArrowDown")  # moves the focus, not the item
            page.keyboard.press("t")
    assert shown_texts(page) == best_first


def test_rank_two_prompts_export_and_train_a_reward_model_that_agrees(browser, page, tmp_path):
    from instructkit.models.reward_model import load_reward_model, score
    from instructkit.train.reward import rm

    tiny = tiny_model_dir(tmp_path / "tiny")
    store = write_store(tmp_path / "store.sqlite", PROMPTS, RESPONSES)
    with serve(tiny_llama(len(real_tokenizer())), label_store=str(store)) as base:
        page.goto(f"{base}/rank")
        page.fill("#annotator", "alice")
        page.click("#start")
        expect(page.locator("#who-name")).to_have_text("alice")
        for done, how in enumerate(["drag", "keyboard"]):
            task = page.locator("#task")
            expect(task).to_be_visible()
            expect(page.locator("#progress")).to_have_attribute("data-ranked", str(done))
            prompt = int(task.get_attribute("data-prompt-id")) - 1
            expect(page.locator("#prompt")).to_contain_text(PROMPTS[prompt][0]["content"])
            assert sorted(shown_texts(page)) == sorted(RESPONSES[prompt])
            if how == "drag":
                order_by_dragging(page, BEST_FIRST[prompt])
                for position, tie in enumerate(TIED[prompt]):
                    if tie:
                        page.locator("#responses > li").nth(position).locator("button.tie").click()
            else:
                order_by_keyboard(page, BEST_FIRST[prompt], TIED[prompt])
            labels = page.locator("#responses .rank-label").all_text_contents()
            assert labels == (["1", "2=", "2="] if TIED[prompt][2] else ["1", "2", "3"])
            page.click("#submit")
        expect(page.locator("#done")).to_be_visible()
        expect(page.locator("#progress")).to_contain_text("Ranked 2 / 2")
        page.reload()  # the name is asked once, then kept in the browser
        expect(page.locator("#who-name")).to_have_text("alice")
        expect(page.locator("#who-form")).to_be_hidden()
        expect(page.locator("#done")).to_be_visible()

    summary = export_rankings(store, tmp_path / "rankings.jsonl")
    assert summary["rankings"] == 2 and summary["annotators"] == ["alice"]
    records = {r["prompt"][0]["content"]: r for r in map(json.loads, (tmp_path / "rankings.jsonl").open())}
    tops, bottoms = [], []
    for prompt, best_first, tied in zip(PROMPTS, BEST_FIRST, TIED):
        record = records[prompt[0]["content"]]
        rank_of = dict(zip(record["responses"], record["ranks"]))
        expected, rank = [], -1
        for tie in tied:
            rank += not tie
            expected.append(rank)
        assert [rank_of[t] for t in best_first] == expected
        tops.append(best_first[0])
        bottoms.append(best_first[-1])

    cfg = {
        "model": str(tiny),
        "out": str(tmp_path / "rm"),
        "data": {"path": str(tmp_path / "rankings.jsonl"), "val_fraction": 0.0, "max_length": 64},
        "peft": {"method": "full"},
        "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_steps": 0},
        "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 30, "progress": False},
    }
    assert rm(cfg)["train_prompts"] == 2
    model, tokenizer, bias = load_reward_model(tmp_path / "rm", device="cpu")
    top = score(model, tokenizer, PROMPTS, [[{"role": "assistant", "content": t}] for t in tops], bias=bias)
    bottom = score(model, tokenizer, PROMPTS, [[{"role": "assistant", "content": t}] for t in bottoms], bias=bias)
    assert all(t > b for t, b in zip(top, bottom)), (top, bottom)


# ----------------------------------------------------------------------------------------------
# Chat


def test_chat_streams_the_answer_and_keeps_the_conversation(browser, page):
    import httpx

    # initializer_range 0.5: varied tokens (at the default 0.02 a random model repeats "\n")
    model = tiny_llama(len(real_tokenizer()), initializer_range=0.5)
    with serve(model, api_key="sekret") as base:
        sent: list[dict] = []
        page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and sent.append(json.loads(r.post_data)))
        page.goto(f"{base}/chat")
        page.click("details.settings summary")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")

        # Without the key: the error is shown and the page asks for the key.
        page.fill("#message", "Hello there!")
        page.keyboard.press("Enter")
        expect(page.locator(".bubble.assistant[data-state=error]")).to_contain_text("API key")
        expect(page.locator("#key-box")).to_be_visible()
        page.fill("#key-input", "sekret")
        page.click("#key-box button[type=submit]")

        # Record the answer's text each time the page changes it.
        page.evaluate("""() => {
            window.lengths = [];
            new MutationObserver(() => {
                const answers = document.querySelectorAll('.bubble.assistant .text');
                window.lengths.push(answers[answers.length - 1].textContent.length);
            }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
        }""")
        page.fill("#message", "Hello there!")
        page.keyboard.press("Enter")
        answer = page.locator(".bubble.assistant").last
        expect(answer).to_have_attribute("data-state", "done")
        text = answer.locator(".text").evaluate("e => e.textContent")
        lengths = [n for n in page.evaluate("window.lengths") if n > 0]
        whole = httpx.post(
            f"{base}/v1/chat/completions",
            headers={"Authorization": "Bearer sekret"},
            json={"messages": [{"role": "user", "content": "Hello there!"}], "temperature": 0, "max_tokens": 24},
            timeout=60,
        ).json()["choices"][0]["message"]["content"]
        assert text == whole and len(text) > 0
        assert int(answer.get_attribute("data-chunks")) > 1  # several server-sent events, not one
        assert len(set(lengths)) > 1 and lengths == sorted(lengths) and lengths[-1] == len(text)  # it grew

        # The next turn sends the conversation so far.
        page.fill("#message", "And again?")
        page.keyboard.press("Enter")
        expect(page.locator(".bubble.assistant").last).to_have_attribute("data-state", "done")
        assert sent[-1]["stream"] is True and sent[-1]["messages"] == [
            {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": text},
            {"role": "user", "content": "And again?"},
        ]
