"""The playground page at ``/`` and the offline ``/docs``, in a real headless Chromium against `deepserve serve`
on a real socket with the tiny test models. Full-page screenshots of each panel go to pytest's tmp dir; the
summary prints where."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.artifacts import make_charlm_artifact, make_classifier_artifact, make_seq2seq_artifact
from tests.browser import WAIT_MS, Page, chromium, generate
from tests.live_server import running_server, scrape

LONG = 100_000
"""The server's max_new_tokens cap here: a generation long enough to still be running when stopped."""
@pytest.fixture(scope="module")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("playground-server")


@pytest.fixture(scope="module")
def base(tmp_path_factory, server_logs) -> Any:
    root = tmp_path_factory.mktemp("playground-repo")
    make_classifier_artifact(root, "tiny-digits", quantize=False, formats=("onnx",))
    make_charlm_artifact(root, "tiny-charlm", quantize=False, formats=("onnx",))
    make_seq2seq_artifact(root, "tiny-seq2seq", quantize=False, formats=("onnx",))
    shutil.copytree(root / "tiny-digits", root / "tampered")  # listed as unavailable, with the reason
    with open(root / "tampered/1/model.onnx", "ab") as f:
        f.write(b"\0")
    with running_server(root, server_logs, "--log-level", "warning",
                        env={"DEEPSERVE_MAX_NEW_TOKENS": str(LONG)}) as server:
        yield server["base"]


@pytest.fixture(scope="module")
def browser() -> Any:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory, request) -> Any:
    directory = tmp_path_factory.mktemp("playground-screenshots")
    yield directory
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # printed whatever the capture mode
        print(f"\nplayground screenshots: {directory}")


@pytest.fixture
def page(browser, base, shots) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield Page(context.new_page(), base, shots)
    finally:
        context.close()


def png(array: np.ndarray, mode: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG")
    return out.getvalue()


def bars(page: Any) -> list[dict[str, Any]]:
    page.wait_for_selector("#bars li", timeout=WAIT_MS)
    return page.eval_on_selector_all("#bars li", "els => els.map(e => ({label: e.dataset.label, "
                                     "probability: Number(e.dataset.probability), text: e.textContent}))")


def model_input(page: Any) -> np.ndarray:
    """The pixels of the page's "what the model sees" canvas, [H, W] (the red channel; it is gray)."""
    data = page.evaluate("""() => { const c = document.getElementById('model-input');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
        return {w: c.width, h: c.height, px: Array.from(d.data)}; }""")
    return np.array(data["px"], dtype=np.uint8).reshape(data["h"], data["w"], 4)[:, :, 0]


# ---- tests ----------------------------------------------------------------------------------------------


def test_the_server_prints_the_playgrounds_address_first(base, server_logs):
    first = (server_logs / "stdout.txt").read_text().splitlines()[0]
    assert first.startswith(f"deepserve: playground at {base}/ ")
    page = httpx.get(first.split(" at ", 1)[1].split()[0])
    assert page.status_code == 200 and "<title>deepserve playground</title>" in page.text


def test_page_loads_with_every_model_and_snippets_and_no_console_errors(page):
    page.open()
    rows = {r[0]: r[1:] for r in page.page.eval_on_selector_all(
        "#models-table tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")}
    assert set(rows) == {"tiny-digits", "tiny-charlm", "tiny-seq2seq", "tampered"}
    for name, task in (("tiny-digits", "image-classification"), ("tiny-charlm", "char-lm"), ("tiny-seq2seq", "seq2seq")):
        assert rows[name] == ["1", task, "onnxruntime_onnx", "fp32", "READY", ""]
    tampered = httpx.get(f"{page.base}/v2/models").json()["models"]
    reason = next(m for m in tampered if m["name"] == "tampered")["version_status"][0]["reason"]
    assert rows["tampered"][4:] == ["UNAVAILABLE", reason] and "sha256" in reason
    page.page.click("summary:has-text('tiny-digits')")
    page.page.click("details:has-text('tiny-digits') button[role=tab]:has-text('tritonclient')")
    snippet = page.page.locator("details:has-text('tiny-digits') .snippet:visible code").inner_text()
    assert "httpclient.InferInput" in snippet and "tiny-digits" in snippet
    page.page.wait_for_selector("#charts[data-scrapes='2']", timeout=WAIT_MS)
    print(page.shoot("page"), page.shoot("models", "#models"))
    assert page.errors == []


def test_uploaded_png_shows_the_apis_top_k_and_the_input_as_the_model_sees_it(page, tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (20, 13, 4), dtype=np.uint8)  # resized and alpha-blended
    path = tmp_path / "digit.png"
    path.write_bytes(png(rgba, "RGBA"))
    page.open()
    page.page.fill("#classify-topk", "4")
    page.page.set_input_files("#classify-file", path)
    shown = bars(page.page)
    answer = httpx.post(f"{page.base}/predictions/tiny-digits?top_k=4", content=path.read_bytes(),
                        headers={"content-type": "image/png"}).json()
    assert [(b["label"], b["probability"]) for b in shown] == [(a["label"], a["probability"]) for a in answer]
    assert [b["text"].endswith(f"{a['probability'] * 100:.2f}%") for b, a in zip(shown, answer)] == [True] * 4
    assert "server" in page.page.inner_text("#classify-latency")
    # the preview is the server's preprocessing: over white, grayscale, Pillow's bilinear resize (±1 rounding)
    over_white = Image.alpha_composite(Image.new("RGBA", (13, 20), "white"), Image.fromarray(rgba, "RGBA"))
    expected = np.asarray(over_white.convert("L").resize((8, 8), Image.Resampling.BILINEAR), dtype=int)
    assert np.abs(model_input(page.page).astype(int) - expected).max() <= 2
    print(page.shoot("classify-upload", "#classify"))
    assert page.errors == []


def test_a_drawn_stroke_is_classified_as_the_model_sees_it(page):
    page.open()
    box = page.page.locator("#draw-canvas").bounding_box()
    mouse = page.page.mouse
    mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.2 * box["height"])
    mouse.down()
    for t in np.linspace(0, 1, 12):  # a "7": across, then down and left
        x, y = (0.3 + 0.4 * t, 0.2) if t < 0.5 else (0.7 - 0.4 * (t - 0.5), 0.2 + 1.2 * (t - 0.5))
        mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
    mouse.up()
    page.page.click("#draw-submit")
    shown = bars(page.page)
    seen = model_input(page.page)
    assert seen.shape == (8, 8) and seen.max() > 100 and seen.min() < 50  # white ink on black, scaled to 8x8
    answer = httpx.post(f"{page.base}/predictions/tiny-digits", content=png(seen, "L"),
                        headers={"content-type": "image/png"}).json()
    assert [(b["label"], b["probability"]) for b in shown] == [(a["label"], a["probability"]) for a in answer]
    print(page.shoot("classify-drawing", "#classify"))
    assert page.errors == []


def test_sampling_streams_text_growing_over_frames_then_finishes_as_the_api_answers(page):
    page.open()
    page.page.evaluate("""() => { window.lengths = [];
        const tick = () => { const t = document.querySelector('#gen-outputs .text');
            if (t) window.lengths.push(t.textContent.length); requestAnimationFrame(tick); };
        requestAnimationFrame(tick); }""")
    generate(page, "tiny-charlm", "sampling", prompt="The ", temperature=0.9, seed=7, max_new=3000)
    page.page.wait_for_selector("#gen-outputs .output[data-state=done]", timeout=WAIT_MS)
    lengths = page.page.evaluate("window.lengths")
    text = page.page.inner_text("#gen-outputs .text")
    grew = sorted(set(lengths))
    assert lengths == sorted(lengths) and len(grew) >= 3 and 0 < grew[1] < grew[-2] < len(text), grew[:5]
    answer = httpx.post(f"{page.base}/v2/models/tiny-charlm/generate", timeout=60, json={
        "text_input": "The ", "parameters": {"temperature": 0.9, "seed": 7, "max_new_tokens": 3000,
                                             "top_p": 0.95, "top_k": 0, "num_return_sequences": 1}}).json()
    assert text == answer["text_output"]
    stats = page.page.inner_text("#gen-outputs .stats")
    assert f"finish: {answer['finish_reason']}" in stats and "first token" in stats and "tokens/s" in stats
    assert "3000 tokens" in stats or answer["finish_reason"] != "length"
    assert page.errors == []


def test_beam_search_streams_the_shared_prefix_growing_then_the_n_best_list(page):
    page.open()
    page.page.evaluate("""() => { window.prefixes = [];
        const tick = () => { const card = document.querySelector('#gen-outputs .output');
            if (card?.dataset.state === 'running' && card.querySelector('.label').textContent.includes('shared prefix'))
                window.prefixes.push(card.querySelector('.text').textContent);
            requestAnimationFrame(tick); };
        requestAnimationFrame(tick); }""")
    generate(page, "tiny-charlm", "beam", prompt="The ", beams=4, n=2, length_penalty=1, max_new=1500)
    page.page.wait_for_selector("#gen-outputs .output[data-state=done] .nbest li", timeout=WAIT_MS)
    prefixes = page.page.evaluate("window.prefixes")
    assert len(set(prefixes)) >= 3 and all(b.startswith(a) for a, b in zip(prefixes, prefixes[1:]))
    shown = page.page.eval_on_selector_all("#gen-outputs .nbest li", "ls => ls.map(l => l.dataset.text)")
    answer = httpx.post(f"{page.base}/v2/models/tiny-charlm/generate", timeout=60, json={"text_input": "The ",
                        "parameters": {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 1500}}).json()
    assert shown == [s["text_output"] for s in answer["sequences"]]
    assert all(text.startswith(prefixes[-1]) for text in shown)  # what streamed is what every beam kept


def test_beam_search_n_best_list_equals_the_apis_and_compare_runs_all_three(page):
    page.open()
    prompt = "What is the tens digit of 52873?"
    generate(page, "tiny-seq2seq", "beam", prompt=prompt, beams=4, n=3, length_penalty=0.8, max_new=12)
    page.page.wait_for_selector("#gen-outputs .output[data-state=done] .nbest li", timeout=WAIT_MS)
    shown = page.page.eval_on_selector_all("#gen-outputs .nbest li", "ls => ls.map(l => [l.dataset.text, "
                                           "Number(l.dataset.score)])")
    answer = httpx.post(f"{page.base}/v2/models/tiny-seq2seq/generate", json={"text_input": prompt, "parameters": {
        "num_beams": 4, "num_return_sequences": 3, "length_penalty": 0.8, "max_new_tokens": 12}}).json()
    assert [s[0] for s in shown] == [s["text_output"] for s in answer["sequences"]]
    assert [s[1] for s in shown] == pytest.approx([s["score"] for s in answer["sequences"]], rel=1e-9)
    assert "3-best" in page.page.inner_text("#gen-outputs .label")
    print(page.shoot("generate-beam", "#generate"))
    page.page.click("#gen-compare")
    page.page.wait_for_function("document.querySelectorAll('#gen-outputs .output[data-state=done]').length == 3",
                                timeout=WAIT_MS)
    modes = page.page.eval_on_selector_all("#gen-outputs .output", "os => os.map(o => o.dataset.mode)")
    assert modes == ["greedy", "sampling", "beam"]
    print(page.shoot("generate-compare", "#generate"))
    assert page.errors == []


def test_stop_cancels_on_the_server_and_running_rows_return_to_zero(page):
    page.open()
    generate(page, "tiny-charlm", "sampling", prompt="The ", max_new=LONG)
    page.page.wait_for_function("document.querySelector('#gen-outputs .text')?.textContent.length > 50",
                                timeout=WAIT_MS)
    assert scrape(page.base, "deepserve_generation_running_rows") >= 1  # still generating on the server
    page.page.click("#gen-stop-button")
    page.page.wait_for_selector("#gen-outputs .output[data-state=stopped]", timeout=WAIT_MS)
    # the page's own gauge, read from /metrics, drops to 0; then so does a direct scrape
    page.page.wait_for_function("document.getElementById('metric-running').textContent === '0'", timeout=WAIT_MS)
    assert scrape(page.base, "deepserve_generation_running_rows") == 0
    assert len(page.page.inner_text("#gen-outputs .text")) < LONG


def _api_error(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, response.text
    return response.json()["error"]


def test_invalid_inputs_show_the_servers_error_next_to_the_control(page):
    page.open()
    page.page.set_input_files("#classify-file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                        "buffer": b"not an image"}])
    expected = _api_error(httpx.post(f"{page.base}/predictions/tiny-digits?top_k=5", content=b"not an image",
                                     headers={"content-type": "text/plain"}))
    page.page.wait_for_selector("#classify-error:visible", timeout=WAIT_MS)
    assert expected in page.page.inner_text("#classify-error")
    page.page.fill("#classify-topk", "0")
    page.page.click("#draw-clear")
    page.page.mouse.click(*_centre(page.page, "#draw-canvas"))
    page.page.click("#draw-submit")
    page.page.wait_for_selector("#classify-topk-error:visible", timeout=WAIT_MS)
    assert "top_k must be an integer from 1" in page.page.inner_text("#classify-topk-error")

    generate(page, "tiny-seq2seq", "beam", prompt="What is 5?", beams=0)
    expected = _api_error(httpx.post(f"{page.base}/v2/models/tiny-seq2seq/generate",
                                     json={"text_input": "What is 5?", "parameters": {"num_beams": 0}}))
    beams_error = page.page.locator(".control:has(#gen-beams) .error")
    beams_error.wait_for(state="visible", timeout=WAIT_MS)
    assert beams_error.inner_text() == expected
    assert page.page.get_attribute("#gen-beams", "aria-invalid") == "true"
    print(page.shoot("generate-error", "#generate"))

    page.page.fill("#gen-beams", "2")
    generate(page, "tiny-seq2seq", "greedy", prompt="")
    expected = _api_error(httpx.post(f"{page.base}/v2/models/tiny-seq2seq/generate", json={"text_input": ""}))
    page.page.wait_for_selector("#gen-prompt-error:visible", timeout=WAIT_MS)
    assert page.page.inner_text("#gen-prompt-error") == expected


def _centre(page: Any, selector: str) -> tuple[float, float]:
    box = page.locator(selector).bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def test_metrics_panel_updates_with_traffic(page):
    page.open()
    page.page.wait_for_selector("#charts[data-scrapes='2']", timeout=WAIT_MS)
    image = png(np.zeros((8, 8), np.uint8), "L")
    for _ in range(20):
        httpx.post(f"{page.base}/predictions/tiny-digits", content=image, headers={"content-type": "image/png"})
    httpx.post(f"{page.base}/v2/models/tiny-charlm/generate", timeout=60,
               json={"text_input": "The ", "parameters": {"max_new_tokens": 2000}})
    for metric in ("requests", "p50", "tokens"):
        page.page.wait_for_function(f"Number(document.getElementById('metric-{metric}').textContent) > 0",
                                    timeout=WAIT_MS)
    assert page.page.locator("#charts polyline").count() == 7
    print(page.shoot("metrics", "#metrics"))
    assert page.errors == []


def test_usable_by_keyboard_at_a_phones_width_with_labelled_controls(browser, base, shots):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = Page(context.new_page(), base, shots).open()
        p = page.page
        assert p.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        unlabelled = p.evaluate("""() => [...document.querySelectorAll('input, select, textarea, canvas[tabindex]')]
            .filter(e => !e.closest('dialog') && e.type !== 'hidden' && !(e.labels?.length || e.getAttribute('aria-label')))
            .map(e => e.id || e.outerHTML)""")
        assert unlabelled == []
        p.select_option("#gen-model", "tiny-charlm")
        p.focus("#gen-prompt")
        p.keyboard.press("Tab")  # into the mode radio group: arrow keys pick the mode
        p.keyboard.press("ArrowLeft")
        assert p.evaluate("document.querySelector('input[name=mode]:checked').value") == "greedy"
        for _ in range(12):
            if p.evaluate("document.activeElement.id") == "gen-run":
                break
            p.keyboard.press("Tab")
        p.keyboard.press("Enter")
        p.wait_for_selector("#gen-outputs .output[data-state=done]", timeout=WAIT_MS)
        print(page.shoot("phone"))
        assert page.errors == []
    finally:
        context.close()


def test_docs_and_redoc_render_with_the_network_blocked(browser, base, shots):
    context = browser.new_context()
    outside: list[str] = []

    def only_this_server(route: Any) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_server)
    try:
        page = context.new_page()
        page.goto(f"{base}/docs")
        page.wait_for_selector(".opblock", timeout=WAIT_MS)
        assert outside == []
        operations = page.locator(".opblock").count()
        paths = httpx.get(f"{base}/openapi.json").json()["paths"]
        # Swagger UI lists an operation once under each of its tags
        assert operations == sum(len(op.get("tags") or [None]) for methods in paths.values() for op in methods.values())
        page.screenshot(path=shots / "docs.png", full_page=True)
        page.goto(f"{base}/redoc")
        page.wait_for_selector("[data-section-id^='operation/']", state="attached", timeout=WAIT_MS)
        # the only outside request: ReDoc's attribution logo, an <img> that removes itself when it fails
        assert [url for url in outside if not url.endswith("/redoc/logo-mini.svg")] == []
    finally:
        context.close()


def test_a_401_asks_for_the_api_key_once_and_every_request_sends_it(browser, tmp_path_factory, shots):
    root = tmp_path_factory.mktemp("keyed-repo")
    make_charlm_artifact(root, "tiny-charlm", quantize=False, formats=("onnx",))
    logs = tmp_path_factory.mktemp("keyed-server")
    with running_server(root, logs, "--api-key", "s3cret", "--log-level", "warning") as server:
        assert httpx.get(f"{server['base']}/v2/models").status_code == 401  # the key is really needed
        context = browser.new_context()
        try:
            page = Page(context.new_page(), server["base"], shots)
            # count the prompts: every request of the first load gets a 401 at once, one dialog asks
            page.page.add_init_script("""window.asked = 0; const show = HTMLDialogElement.prototype.showModal;
                HTMLDialogElement.prototype.showModal = function () { window.asked++; return show.call(this); };""")
            page.page.goto(server["base"] + "/")
            page.page.wait_for_selector("#key-dialog[open]", timeout=WAIT_MS)
            page.shoot("api-key")
            page.page.fill("#key-input", "s3cret")
            page.page.click("#key-form button[value=ok]")
            page.page.wait_for_selector("body[data-ready]", timeout=WAIT_MS)
            assert page.page.locator("#models-table tbody tr").count() == 1
            assert page.page.evaluate("sessionStorage.getItem('deepserve.apiKey')") == "s3cret"
            generate(page, "tiny-charlm", "sampling", prompt="The ", max_new=200)  # a stream sends it too
            page.page.wait_for_selector("#gen-outputs .output[data-state=done]", timeout=WAIT_MS)
            page.page.wait_for_selector("#charts[data-scrapes='3']", timeout=WAIT_MS)
            assert page.page.evaluate("window.asked") == 1
        finally:
            context.close()
