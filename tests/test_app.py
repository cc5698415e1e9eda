"""`diffcap serve`: the JSON API and its limits, 32 concurrent requests, and the page in a real browser.

One server process (`python -m diffcap.cli serve TINY_CHECKPOINT --port 0`) is shared by the module; it listens
on 127.0.0.1 only. The browser test drives Debian's chromium through Playwright; it skips when that browser is
missing, except in CI (CI=true), where `.ci/run` installs it and a skip would hide a broken page.
"""

from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffcap.app import CaptionService, Limits, measure_latency, post_caption, resolve_checkpoint
from diffcap.captioner import Captioner, Sample, format_trajectory, trajectory_steps
from diffcap.cli import main
from diffcap.pipeline import Generation, load_model

CHROMIUM = Path(os.environ.get("DIFFCAP_CHROMIUM", "/usr/bin/chromium"))
MAX_UPLOAD_MB = 0.2
MAX_PIXELS = 1_000_000
STEPS = 5


def _dev_images(shapes_jsonl: Path) -> list[Path]:
    return sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))


def _assert_same_samples(got: list[dict], expected: list[dict]) -> None:
    """Equal captions, steps and word pieces; confidences equal up to float noise (batching, threads)."""
    assert [s["caption"] for s in got] == [s["caption"] for s in expected]
    for a, b in zip(got, expected):
        assert [(s["t"], s["caption"], [k["token"] for k in s["tokens"]]) for s in a["trajectory"]] == \
            [(s["t"], s["caption"], [k["token"] for k in s["tokens"]]) for s in b["trajectory"]]
        for sa, sb in zip(a["trajectory"], b["trajectory"]):
            assert [k["confidence"] for k in sa["tokens"]] == pytest.approx([k["confidence"] for k in sb["tokens"]],
                                                                            abs=0.002)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """URL of a `diffcap serve` process on a free localhost port, serving the tiny checkpoint."""
    log_path = tmp_path_factory.mktemp("serve") / "stderr.log"
    argv = [sys.executable, "-m", "diffcap.cli", "serve", str(tiny_checkpoint), "--port", "0",
            "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-pixels", str(MAX_PIXELS)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, stdin=subprocess.DEVNULL)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        try:
            line = lines.get(timeout=300)
        except queue.Empty:
            pytest.fail(f"diffcap serve did not start in 300 s: {log_path.read_text()[-2000:]}")
        assert line.startswith("serving ") and " on http://127.0.0.1:" in line, (line, log_path.read_text()[-2000:])
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.from_pretrained(tiny_checkpoint)


def _get_json(url: str) -> tuple[int, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- the shared trajectory representation ---------------------------------------------------------------------


def test_trajectory_tokens_follow_merged_repeats(tiny_checkpoint: Path) -> None:
    model, _ = load_model(tiny_checkpoint)
    space = model.space
    index = {space.tokenizer.convert_ids_to_tokens(int(full)): i for i, full in enumerate(space.vocab_ids.tolist())}
    words = ["a", "red", "red", "circle"]
    ids = torch.full((1, space.max_length), space.pad_index)
    ids[0, :4] = torch.tensor([index[w] for w in words])
    ids[0, 4] = space.sep_index
    ids[0, 5] = index["blue"]  # after the end: not part of the caption
    confidence = torch.full((1, space.max_length), 0.5)
    confidence[0, :4] = torch.tensor([0.9, 0.2, 0.6, 0.7])
    gen = Generation(["a red circle"], [(7, ["a red circle"], confidence, ids)])
    model.config.sample.collapse_repeats = True
    (step,) = trajectory_steps(model, gen)
    assert step.t == 7 and step.caption == "a red circle"
    assert step.tokens == [("a", 0.9), ("red", 0.6), ("circle", 0.7)]  # a merged repeat keeps its best confidence
    assert step.to_dict() == {"t": 7, "caption": "a red circle", "tokens": [
        {"token": "a", "confidence": 0.9}, {"token": "red", "confidence": 0.6}, {"token": "circle", "confidence": 0.7}]}
    assert format_trajectory([step]) == ["t=   7  a red circle"]
    assert format_trajectory([step], confidence=True) == ["t=   7  a red circle   [a:0.90 red:0.60 circle:0.70]"]
    model.config.sample.collapse_repeats = False
    assert [p for p, _ in trajectory_steps(model, gen)[0].tokens] == words


def test_samples_match_caption_and_trajectory(captioner: Captioner, shapes_jsonl: Path) -> None:
    image = _dev_images(shapes_jsonl)[0]
    samples = captioner.samples(image, 3, steps=STEPS, seed=1)
    (result,) = captioner.caption_stream([image], steps=STEPS, seed=1, candidates=3)
    assert [s.caption for s in samples] == result.candidates  # sample k is candidate k (the noise of seed 1 + k)
    assert [s.caption for s in samples if s.chosen] == [result.caption]  # one kept, the caption's
    assert [s.caption for s in captioner.samples(image, 1, steps=STEPS, seed=1)] == \
        captioner.caption([image], steps=STEPS, seed=1, candidates=1)
    # the checkpoint samples one caption: by default one sample, its caption and its trajectory
    (alone,) = captioner.samples(image, steps=STEPS, seed=1)
    assert alone.chosen and alone.to_dict() == {**samples[0].to_dict(), "chosen": True}
    _assert_same_samples([alone.to_dict()], [Sample(alone.caption, captioner.trajectory(image, steps=STEPS, seed=1),
                                                    chosen=True).to_dict()])
    assert [s.t for s in samples[1].trajectory] == [s.t for s in samples[0].trajectory]
    assert len(samples[0].trajectory) == STEPS and samples[0].trajectory[-1].t == 0
    assert captioner.samples(image, 2, steps=STEPS, trajectory=False)[1].trajectory == []


def test_samples_and_trajectory_follow_the_kept_candidate(matched_checkpoint: Path, shapes_jsonl: Path) -> None:
    """With several candidates and the matcher (and the model's own score) choosing, `samples` are exactly the
    candidates `caption` draws for the image at its index, the kept one marked, and `trajectory` ends in it."""
    captioner = Captioner.from_pretrained(matched_checkpoint)
    sample = captioner.model.config.sample
    sample.candidates, sample.select, sample.self_weight = 3, "match", 0.5
    images = _dev_images(shapes_jsonl)
    results = list(captioner.caption_stream(images, steps=STEPS, seed=4))
    kept = []
    for index, (image, result) in enumerate(zip(images, results)):
        samples = captioner.samples(image, steps=STEPS, seed=4, index=index)
        assert [s.caption for s in samples] == result.candidates and len(samples) == 3
        (k,) = [k for k, s in enumerate(samples) if s.chosen]
        assert samples[k].caption == result.caption
        assert captioner.trajectory(image, steps=STEPS, seed=4, index=index) == samples[k].trajectory
        kept.append(k)
    assert any(k != 0 for k in kept), kept  # the choice moved off the first sample somewhere, and was followed


def test_the_kept_sample_is_the_choice_made(captioner: Captioner, shapes_jsonl: Path, monkeypatch) -> None:
    import diffcap.captioner

    image = _dev_images(shapes_jsonl)[1]
    monkeypatch.setattr(diffcap.captioner, "choose_candidates", lambda *args, **kwargs: [2])
    samples = captioner.samples(image, 3, steps=STEPS, seed=1)
    assert [s.chosen for s in samples] == [False, False, True]
    service = CaptionService(captioner)
    answer = service.caption(Image.open(image).convert("RGB"), {"steps": str(STEPS), "samples": "3", "seed": "1"})
    assert answer["chosen"] == 2 and answer["caption"] == samples[2].caption
    assert [s["chosen"] for s in answer["samples"]] == [False, False, True]


def test_cli_trajectory_json_is_the_api_format(tiny_checkpoint: Path, shapes_jsonl: Path, captioner: Captioner,
                                               capsys) -> None:
    image = _dev_images(shapes_jsonl)[1]
    assert main(["caption", str(tiny_checkpoint), str(image), "--trajectory", "--json", "--steps", "4"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    sample = captioner.samples(image, 1, steps=4)[0]
    assert record.pop("path") == str(image)
    _assert_same_samples([record], [sample.to_dict()])
    assert main(["caption", str(tiny_checkpoint), str(image), "--trajectory", "--confidence", "--steps", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("[")[0] for line in lines[1:]] == \
        ["  " + line.split("[")[0] for line in format_trajectory(sample.trajectory, confidence=True)]


def test_cli_trajectory_follows_the_caption_it_keeps(matched_checkpoint: Path, shapes_jsonl: Path, capsys) -> None:
    """`caption --trajectory` shows the trajectory of the caption plain `caption` prints, for every image of the
    list (its index is its noise) and with the choice among candidates applied."""
    images = [str(p) for p in _dev_images(shapes_jsonl)]
    common = [str(matched_checkpoint), *images, "--steps", str(STEPS), "--seed", "4", "--candidates", "3",
              "--select", "match", "--self-weight", "0.5", "--json"]
    assert main(["caption", *common]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["caption", *common, "--trajectory"]) == 0
    followed = json.loads(capsys.readouterr().out)
    assert [(r["path"], r["caption"], r["candidates"]) for r in followed] == \
        [(r["path"], r["caption"], r["candidates"]) for r in plain]
    assert all(r["trajectory"][-1]["caption"] == r["caption"] for r in followed)
    assert any(r["caption"] != r["candidates"][0] for r in plain)  # the choice is not simply the first sample
    assert main(["caption", *common[:-1], "--trajectory"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{images[0]}: (the kept one of 3 samples)"


# -- checkpoint resolution -------------------------------------------------------------------------------------


def test_serve_without_checkpoint_is_a_clear_error(monkeypatch, tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    import diffcap.app

    monkeypatch.setattr(diffcap.app, "DEFAULT_CHECKPOINT", tmp_path / "nothing-here")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no CHECKPOINT given" in err and str(tmp_path / "nothing-here") in err
    monkeypatch.setattr(diffcap.app, "DEFAULT_CHECKPOINT", tiny_checkpoint)
    assert resolve_checkpoint(None) == tiny_checkpoint
    assert resolve_checkpoint(tmp_path) == tmp_path


def test_serve_on_a_busy_port_is_a_clear_error(captioner: Captioner) -> None:
    from diffcap.app import make_server

    first = make_server(CaptionService(captioner), "127.0.0.1", 0)
    try:
        with pytest.raises(ValueError, match="cannot listen on 127.0.0.1"):
            make_server(CaptionService(captioner), "127.0.0.1", first.server_address[1])
    finally:
        first.server_close()


def test_service_limits_apply_before_decoding(captioner: Captioner) -> None:
    from diffcap.app import RequestError

    service = CaptionService(captioner, limits=Limits(max_bytes=1000, max_pixels=100))
    with pytest.raises(RequestError, match="more than the limit of 0.0 MB"):
        service.load_upload(b"x" * 1001, "big.png")
    with pytest.raises(RequestError, match="tiny.png: image is 20x20 = 400 pixels, more than the limit"):
        service.load_upload(_png_bytes(Image.new("RGB", (20, 20))), "tiny.png")


# -- the HTTP API ----------------------------------------------------------------------------------------------


def test_api_info(server: str, captioner: Captioner) -> None:
    status, info = _get_json(server + "api/info")
    assert status == 200
    assert info["defaults"]["steps"] == captioner.model.config.sample.steps and info["trajectory"] is True
    assert info["limits"] == {"max_bytes": int(MAX_UPLOAD_MB * 1e6), "max_pixels": MAX_PIXELS, "max_steps": 100,
                              "max_samples": 8}
    assert len(info["examples"]) == 4 and all(e["label"] for e in info["examples"])
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(server + info["examples"][0]["url"]) as r:
        assert r.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(r.read())).size[0] <= 160


def test_api_caption_is_the_captioners(server: str, captioner: Captioner, shapes_jsonl: Path) -> None:
    image = _dev_images(shapes_jsonl)[2]
    status, answer = post_caption(server, image.read_bytes(), {"steps": STEPS, "samples": 3, "seed": 2},
                                  filename=image.name)
    assert status == 200, answer
    expected = captioner.samples(image, 3, steps=STEPS, seed=2)
    assert answer["captions"] == [s.caption for s in expected]
    _assert_same_samples(answer["samples"], [s.to_dict() for s in expected])
    assert answer["image"] == image.name and answer["steps"] == STEPS and answer["seed"] == 2
    for step in answer["samples"][0]["trajectory"]:
        assert all(0.0 <= tok["confidence"] <= 1.0 for tok in step["tokens"])

    status, example = post_caption(server, b"", {"example": 1, "steps": STEPS, "trajectory": 0})
    assert status == 200 and len(example["captions"]) == 1 and example["samples"][0]["trajectory"] == []


@pytest.mark.parametrize("body, name, params, status, message", [
    (b"hello, I am text", "notes.jpg", {}, 400, "notes.jpg: not a recognised image format"),
    (b"", "empty.png", {}, 400, "empty.png: the file is empty"),
    ("truncated", "cut.png", {}, 400, "cut.png: "),
    ("bomb", "huge.png", {}, 400, "huge.png: image is 1200x1000 = 1,200,000 pixels, more than the limit"),
    (b"x" * int(MAX_UPLOAD_MB * 1e6 + 1), "big.jpg", {}, 413, "big.jpg: the file is 0.2 MB, more than the limit"),
    ("ok", "a.png", {"steps": 0}, 400, "steps must be between 1 and 100, got 0"),
    ("ok", "a.png", {"steps": "many"}, 400, "steps must be a whole number"),
    ("ok", "a.png", {"samples": 99}, 400, "samples must be between 1 and 8"),
    ("ok", "a.png", {"guidance": "nan"}, 400, "guidance must be between 0 and 20"),
    (b"", "", {"example": 77}, 404, "no example '77'"),
])
def test_api_refuses_bad_requests_with_one_line(server: str, body, name: str, params: dict, status: int,
                                                message: str) -> None:
    if body == "truncated":
        body = _png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))[:-300]
    elif body == "bomb":
        body = _png_bytes(Image.new("RGB", (1200, 1000), "white"))  # small file, too many pixels
    elif body == "ok":
        body = _png_bytes(Image.new("RGB", (32, 32), "red"))
    got, answer = post_caption(server, body, params, filename=name)
    assert got == status, answer
    assert set(answer) == {"error"} and message in answer["error"], answer
    assert "Traceback" not in answer["error"] and "\n" not in answer["error"]


def test_unknown_paths_are_json_404(server: str) -> None:
    assert _get_json(server + "nope") == (404, {"error": "no page '/nope'"})


def test_32_concurrent_requests_each_get_their_own_answer(server: str, captioner: Captioner,
                                                          shapes_jsonl: Path) -> None:
    """32 requests at once, each a different (image, seed, number of samples): every answer is its own."""
    images = _dev_images(shapes_jsonl)
    jobs = [(images[i % len(images)], i % 5, 1 + i % 3) for i in range(32)]
    expected = {job: [s.caption for s in captioner.samples(job[0], job[2], steps=STEPS, seed=job[1], trajectory=False)]
                for job in set(jobs)}
    start = threading.Barrier(32)

    def send(job):
        image, seed, samples = job
        start.wait(timeout=60)
        return post_caption(server, image.read_bytes(), {"steps": STEPS, "seed": seed, "samples": samples,
                                                         "trajectory": 0}, filename=f"{image.name}")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(send, jobs))
    for job, (status, answer) in zip(jobs, answers):
        assert status == 200, answer
        assert (answer["image"], answer["seed"], answer["captions"]) == (job[0].name, job[1], expected[job])

    # the measuring helper behind `diffcap serve --benchmark`
    result = measure_latency(server, [p.read_bytes() for p in images], requests=32, concurrency=32,
                             params={"steps": STEPS, "trajectory": 0})
    assert result["errors"] == 0 and len(result["answers"]) == 32
    single = [captioner.caption(image, steps=STEPS) for image in images]  # the checkpoint's seed
    assert [a["captions"] for a in result["answers"]] == [single[i % len(images)] for i in range(32)]
    assert 0 < result["p50"] <= result["p90"] <= result["p99"] <= result["max"] <= result["wall"]


def test_serve_benchmark_prints_latency_percentiles(tiny_checkpoint: Path, capsys) -> None:
    assert main(["serve", str(tiny_checkpoint), "--benchmark", "4", "--concurrency", "2", "--steps", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("4 requests, 2 concurrent, over localhost HTTP: p50 ") and "p99" in line
    assert line.endswith("0 errors)")


# -- the page in a real browser --------------------------------------------------------------------------------


def _browser_or_skip():
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        problem, sync_playwright = f"playwright is not installed ({exc})", None
    if problem is None and not CHROMIUM.exists():
        problem = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if problem:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"the browser test must run in CI: {problem}")
        pytest.skip(problem)
    return sync_playwright


BROWSER_ARGS = ["--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-domain-reliability", "--no-first-run", "--no-default-browser-check",
                "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
                "--metrics-recording-only", "--no-pings"]


def test_page_in_a_real_browser(server: str, captioner: Captioner, shapes_jsonl: Path, tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    image = _dev_images(shapes_jsonl)[0]
    expected = captioner.samples(image, 1, steps=STEPS)[0]
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)  # a busy 2-core machine
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server)
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            assert page.locator("#examples button").count() == 4
            page.fill("#steps", str(STEPS))

            # an upload: the caption and the trajectory, one row per step, shaded by confidence
            page.set_input_files("#file", str(image))
            page.wait_for_selector("body[data-state='done']", timeout=180_000)
            assert page.inner_text("#error") == ""
            assert page.locator("#captions li").all_inner_texts() == [expected.caption or "(empty caption)"]
            rows = page.locator("#trajectory tr.step")
            assert rows.count() == STEPS
            assert [int(t) for t in rows.evaluate_all("rs => rs.map(r => r.dataset.t)")] == \
                [s.t for s in expected.trajectory]
            assert rows.evaluate_all("rs => rs.map(r => r.dataset.caption)") == [s.caption for s in expected.trajectory]
            confidences = page.locator("#trajectory tr.step").last.locator(".tok").evaluate_all(
                "ts => ts.map(t => parseFloat(t.dataset.confidence))")
            assert confidences == pytest.approx([c for _, c in expected.trajectory[-1].tokens], abs=0.002)
            if confidences:
                shade = page.locator("#trajectory tr.step").last.locator(".tok").first.evaluate(
                    "t => getComputedStyle(t).backgroundColor")
                assert shade.startswith("rgba(37, 99, 235")
            assert "captioning" not in page.inner_text("#status") and f"{STEPS} steps" in page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)

            # an example with three samples: clicking a caption shows its trajectory
            page.fill("#samples", "3")
            page.evaluate("document.body.dataset.state = ''")
            page.locator("#examples button").nth(2).click()
            page.wait_for_selector("body[data-state='done']", timeout=180_000)
            assert page.locator("#captions li").count() == 3
            page.locator("#captions li").nth(1).click()
            assert page.inner_text("#traj-which") == "(caption 2)"

            # a text file named .jpg: a one-line message on the page, no traceback, the old results cleared
            page.evaluate("document.body.dataset.state = ''")
            page.set_input_files("#file", files=[{"name": "notes.jpg", "mimeType": "image/jpeg",
                                                  "buffer": b"this is not a picture"}])
            page.wait_for_selector("body[data-state='done']", timeout=180_000)
            error = page.inner_text("#error")
            assert error == "notes.jpg: not a recognised image format"
            assert page.locator("#captions li").count() == 0 and page.locator("#trajectory tr").count() == 0
            assert "Traceback" not in page.content()
            page.screenshot(path=str(tmp_path / "error.png"), full_page=True)
        finally:
            browser.close()
    outside = [u for u in requested if not (u.startswith(server) or u.startswith(("blob:", "data:")))]
    assert not outside, f"the page made requests outside the server: {outside}"
