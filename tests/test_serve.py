"""Serving a model: the Ray-free request service, the follower, and one real Ray Serve app over HTTP."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inpaint import Inpainter
from inpaint.serving import (CheckpointFollower, InpaintService, ModelSlot, RequestError, best_score, check_fields,
                             decode_image, load_model)
from tests.serve_harness import debug_checkpoint, png, running_app


def photo(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def hole_mask(height: int, width: int, top: int, left: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:top + h, left:left + w] = 255
    return mask


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width x height (400 MP): PIL refuses it from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy as training writes one: meta.json (what makes it a checkpoint) last."""
    target.mkdir()
    for path in sorted(source.iterdir()):
        if path.name != "meta.json":
            shutil.copy(path, target / path.name)
    shutil.copy(source / "meta.json", target / "meta.json")


def corrupt(checkpoint: Path) -> None:
    weights = checkpoint / "generator.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"\xff" * 10
    weights.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A run folder with debug checkpoints at steps 1, 2, 3 and 4 (the follow tests copy them from here)."""
    return debug_checkpoint(tmp_path_factory.mktemp("serve") / "source", (1, 2, 3, 4))


@pytest.fixture(scope="module")
def service(checkpoints) -> InpaintService:
    return InpaintService(ModelSlot(load_model(str(checkpoints / "checkpoint_000000002"))))


# ------------------------------------------------------------------ the request service, no Ray
def test_answer_fills_only_the_hole_and_returns_png_or_jpeg(service, checkpoints):
    image, mask = photo(40, 50, 0), hole_mask(40, 50, 10, 10, 12, 20)
    data, content_type, checkpoint = service.answer(png(image), png(mask), blend=False, output_format="png")
    assert content_type == "image/png" and checkpoint.endswith("checkpoint_000000002")
    filled = np.asarray(Image.open(io.BytesIO(data)))
    expected = Inpainter.from_checkpoint(str(checkpoints / "checkpoint_000000002")).fill_array(image, mask > 0,
                                                                                              blend=False)
    assert np.array_equal(filled, expected)
    data, content_type, _ = service.answer(png(image), png(mask), blend="true", output_format="JPG")
    assert content_type == "image/jpeg" and Image.open(io.BytesIO(data)).format == "JPEG"


@pytest.mark.parametrize("image, mask, status, match", [
    (b"not an image", None, 415, "image: not an image PIL can read"),
    ("truncated", None, 400, "truncated or damaged"),
    ("bomb", None, 413, "decompression-bomb"),
    (b"", None, 400, "image is empty"),
    (None, "small", 422, "mask is 20x10 but the image is 50x40"),
    (None, "empty", 422, "mask has no hole"),
    (None, "full", 422, "covers the whole image"),
])
def test_bad_images_and_masks_are_refused_with_a_status_and_one_line(service, image, mask, status, match):
    good_image, good_mask = png(photo(40, 50, 0)), png(hole_mask(40, 50, 5, 5, 10, 10))
    image = {"truncated": good_image[:len(good_image) // 2], "bomb": bomb_png(), None: good_image}.get(image, image)
    mask = {"small": png(np.full((10, 20), 255, np.uint8)), "empty": png(np.zeros((40, 50), np.uint8)),
            "full": png(np.full((40, 50), 255, np.uint8)), None: good_mask}[mask]
    with pytest.raises(RequestError) as caught:
        service.answer(image, mask)
    assert caught.value.status == status and match in caught.value.message and "\n" not in caught.value.message


def test_fields_and_options_are_checked():
    with pytest.raises(RequestError, match="unknown field.*blnd") as caught:
        check_fields(["image", "mask", "blnd"])
    assert caught.value.status == 422
    with pytest.raises(RequestError, match="missing field.*mask"):
        check_fields(["image"])
    with pytest.raises(RequestError, match="format must be"):
        InpaintService(None).answer(b"", b"", output_format="gif")
    with pytest.raises(RequestError, match="blend must be"):
        InpaintService(None).answer(b"", b"", blend="maybe")


def test_model_info_names_the_checkpoint_and_its_evaluation(checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoints, run)
    figures = {"center_1/4": {"hole_psnr": {"mean": 21.5, "std": 1.0, "count": 8}}}
    (run / "evaluations" / "checkpoint_000000004").mkdir(parents=True)
    (run / "evaluations" / "checkpoint_000000004" / "metrics.json").write_text(json.dumps({"metrics": figures}))
    info = InpaintService(ModelSlot(load_model(str(run)))).model_info()
    assert info["checkpoint"] == str(run / "checkpoint_000000004") and info["step"] == 4
    assert info["recipe"] == "debug" and info["image_size"] == 32
    assert info["evaluation"] == {"center_1/4": {"hole_psnr": 21.5}}


def test_follower_moves_to_newer_checkpoints_and_skips_ones_that_do_not_load(checkpoints, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    copy_checkpoint(checkpoints / "checkpoint_000000001", run / "checkpoint_000000001")
    follower = CheckpointFollower(str(run), "newest", str(run / "checkpoint_000000001"), attempts=2)
    assert follower.poll() is None
    copy_checkpoint(checkpoints / "checkpoint_000000002", run / "checkpoint_000000002")
    copy_checkpoint(checkpoints / "checkpoint_000000003", run / "checkpoint_000000003")
    corrupt(run / "checkpoint_000000003")
    moved = follower.poll()
    assert moved.checkpoint_url == str(run / "checkpoint_000000002")  # the newest that loads
    assert "checkpoint_000000003" in caplog.text
    assert follower.poll() is None and str(run / "checkpoint_000000003") in follower.rejected  # 2 failures: given up
    assert follower.poll() is None


def test_follower_best_moves_to_the_best_evaluated_checkpoint(checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoints, run)
    for step, psnr in ((1, 20.0), (2, 22.0), (3, 21.0)):
        folder = run / "evaluations" / f"checkpoint_{step:09d}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"metrics": {"random": {"hole_psnr": {"mean": psnr}}}}))
    follower = CheckpointFollower(str(run), "best", str(run / "checkpoint_000000004"))  # served, not evaluated
    assert follower.poll().checkpoint_url == str(run / "checkpoint_000000002")
    assert follower.poll() is None
    assert best_score({"a": {"hole_psnr": 20.0}, "b": {"hole_psnr": 22.0}}) == 21.0


def test_decode_image_follows_exif_orientation():
    buffer = io.BytesIO()
    image = Image.fromarray(photo(10, 20, 1))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    assert decode_image(buffer.getvalue(), "image", "RGB").size == (10, 20)


@pytest.mark.slow  # importing Ray Serve and FastAPI takes ~10 s here
def test_run_batch_stacks_same_shape_windows_of_one_model_and_answers_each_in_order(checkpoints):
    import torch

    from cluster.serve import run_batch

    first, second = (Inpainter.from_checkpoint(str(checkpoints / f"checkpoint_00000000{step}")).generator
                     for step in (2, 4))
    calls = []

    def counting(generator):
        def call(pixels, known):
            calls.append(pixels.shape[0])
            return generator(pixels, known)
        return call

    first_counted, second_counted = counting(first), counting(second)
    items = []
    for index, (model, size) in enumerate([(first_counted, 32), (first_counted, 32), (second_counted, 32),
                                           (first_counted, 36), (first_counted, 32)]):
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(index))
        known = torch.ones(1, 1, size, size)
        known[..., 8:20, 8:20] = 0
        items.append((model, pixels, known))
    results = run_batch(items)
    assert sorted(calls) == [1, 1, 3]  # three 32 px windows of the first model went through together
    with torch.no_grad():
        for (model, pixels, known), result in zip(items, results):
            single = (first if model is first_counted else second)(pixels, known)
            assert torch.allclose(result, single, atol=1e-5)


# ------------------------------------------------------------------ one real Serve app, over HTTP
@pytest.fixture(scope="module")
def app(checkpoints, tmp_path_factory):
    """One Serve app for every HTTP test, on a run that starts at checkpoint 2 and is followed (newest)."""
    run = tmp_path_factory.mktemp("served") / "run"
    run.mkdir()
    for step in (1, 2):
        copy_checkpoint(checkpoints / f"checkpoint_{step:09d}", run / f"checkpoint_{step:09d}")
    shutil.copy(checkpoints / "config.json", run / "config.json")
    # Batching on (as on a GPU) so that its path is what these tests drive: up to 4 fills at once, 5 more queued.
    with running_app(str(run), follow="newest", follow_interval_s=0.5, concurrency=4, queue=5, batch=4,
                     max_body_bytes=2 * 2**20) as base:
        yield base, run


@pytest.fixture(scope="module")
def expected(checkpoints):
    """Checkpoint name -> a local Inpainter of it, to check each answer against its own input."""
    return {name: Inpainter.from_checkpoint(str(checkpoints / name))
            for name in ("checkpoint_000000002", "checkpoint_000000003", "checkpoint_000000004")}


def post(base: str, **kwargs):
    import requests

    return requests.post(f"{base}/v1/inpaint", timeout=120, **kwargs)


def check_answer(reply, image: np.ndarray, mask: np.ndarray, expected: dict) -> str:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png"
    filled = np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB"))
    hole = mask > 0
    assert np.array_equal(filled[~hole], image[~hole]), "known pixels differ: another request's image?"
    want = expected[reply.headers["x-checkpoint"]].fill_array(image, hole, blend=False)  # the requests ask for raw
    # The replica runs torch on 1 thread, this process on 2: allow one grey level of rounding.
    assert np.abs(filled.astype(int) - want.astype(int)).max() <= 1
    return reply.headers["x-checkpoint"]




@pytest.mark.slow
@pytest.mark.ray
def test_http_multipart_and_json_fill_the_hole(app, expected):
    import requests

    base, _ = app
    image, mask = photo(48, 64, 3), hole_mask(48, 64, 10, 20, 16, 16)
    reply = post(base, files={"image": ("a.png", png(image)), "mask": ("m.png", png(mask))},
                 data={"blend": "false", "format": "png"})
    check_answer(reply, image, mask, expected)
    reply = post(base, json={"image": base64.b64encode(png(image)).decode(), "mask": base64.b64encode(png(mask)).decode(),
                             "blend": False, "format": "png"})
    check_answer(reply, image, mask, expected)
    reply = post(base, json={"image": base64.b64encode(png(image)).decode(), "mask": base64.b64encode(png(mask)).decode(),
                             "format": "jpeg"})  # blend defaults to on
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
    model = requests.get(f"{base}/v1/model", timeout=30).json()
    assert model["recipe"] == "debug" and model["image_size"] == 32 and model["checkpoint"].endswith("checkpoint_000000002")
    assert requests.get(f"{base}/healthz", timeout=30).json()["status"] == "ok"
    spec = requests.get(f"{base}/openapi.json", timeout=30).json()
    assert {"/v1/inpaint", "/v1/model", "/healthz"} <= set(spec["paths"])
    docs = requests.get(f"{base}/docs", timeout=30).text
    assert "/v1/inpaint" in docs and "<script" not in docs  # works offline: nothing fetched from a CDN
    page = requests.get(f"{base}/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


@pytest.mark.slow
@pytest.mark.ray
def test_http_bad_input_gets_a_status_and_a_one_line_json_error(app):
    import requests

    base, _ = app
    image, mask = png(photo(40, 50, 0)), png(hole_mask(40, 50, 5, 5, 10, 10))
    cases = [
        ({"files": {"image": ("a.png", b"hello"), "mask": ("m.png", mask)}}, 415),
        ({"files": {"image": ("a.png", image[:len(image) // 2]), "mask": ("m.png", mask)}}, 400),
        ({"files": {"image": ("a.png", bomb_png()), "mask": ("m.png", mask)}}, 413),
        ({"files": {"image": ("a.png", image), "mask": ("m.png", png(np.full((10, 20), 255, np.uint8)))}}, 422),
        ({"files": {"image": ("a.png", image), "mask": ("m.png", png(np.zeros((40, 50), np.uint8)))}}, 422),
        ({"files": {"image": ("a.png", image), "mask": ("m.png", mask), "colour": (None, "red")}}, 422),
        ({"files": {"image": ("a.png", image)}}, 422),
        ({"files": {"image": ("a.png", image), "mask": ("m.png", mask)}, "data": {"format": "gif"}}, 422),
        ({"json": {"image": "aGVsbG8=", "mask": "aGVsbG8=", "extra": 1}}, 422),
        ({"json": ["image"]}, 422),
        ({"data": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ({"json": {"image": "***", "mask": "aGVsbG8="}}, 400),
        ({"data": b"image=1", "headers": {"content-type": "text/plain"}}, 415),
        ({"data": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422),  # no fields
        ({"files": {"image": ("a.png", b"\0" * (3 * 2**20)), "mask": ("m.png", mask)}}, 413),  # Content-Length
        ({"data": (b"\0" * 2**16 for _ in range(48)), "headers": {"content-type": "application/json"}}, 413),  # chunked
    ]
    for kwargs, status in cases:
        reply = post(base, **kwargs)
        assert reply.status_code == status, (kwargs.keys(), reply.status_code, reply.text)
        body = reply.json()
        assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]
    reply = requests.get(f"{base}/v1/nothing", timeout=30)
    assert reply.status_code == 404 and set(reply.json()) == {"error"}
    reply = requests.get(f"{base}/v1/inpaint", timeout=30)
    assert reply.status_code == 405 and set(reply.json()) == {"error"}


@pytest.mark.slow
@pytest.mark.ray
def test_http_concurrent_requests_never_mix_up_images(app, expected):
    base, _ = app
    jobs = []
    for seed in range(24):  # different sizes and holes, so a mixed-up answer cannot pass
        height, width = 40 + seed, 60 - seed
        jobs.append((photo(height, width, 100 + seed), hole_mask(height, width, seed % 7, seed % 11, 12, 14)))

    def one(job):
        image, mask = job
        reply = post(base, files={"image": ("a.png", png(image)), "mask": ("m.png", png(mask))},
                     data={"blend": "false"})
        return check_answer(reply, image, mask, expected)

    with ThreadPoolExecutor(8) as pool:  # 8 in flight: within the replica's 4 running + 5 queued
        list(pool.map(one, jobs))


@pytest.mark.slow
@pytest.mark.ray
def test_http_too_many_requests_get_503_with_retry_after(app):
    base, _ = app
    # A large window (slow to fill) in a small upload (a tiled patch compresses well).
    image, mask = png(np.tile(photo(16, 16, 7), (64, 64, 1))), png(hole_mask(1024, 1024, 100, 100, 400, 400))
    barrier = threading.Barrier(40)

    def one(_):
        barrier.wait()
        return post(base, files={"image": ("a.png", image), "mask": ("m.png", mask)}, data={"blend": "false"})

    with ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(one, range(40)))
    refused = [reply for reply in replies if reply.status_code == 503]
    assert refused, [reply.status_code for reply in replies]
    assert all(reply.status_code in (200, 503) for reply in replies)
    assert all(reply.headers.get("retry-after") and set(reply.json()) == {"error"} for reply in refused)


@pytest.mark.slow
@pytest.mark.ray
def test_follow_moves_to_a_new_checkpoint_while_requests_run_and_none_fails(app, checkpoints, expected):
    import requests

    base, run = app
    answers: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        while not stop.is_set():
            image, mask = photo(36, 44, seed), hole_mask(36, 44, 8, 8, 12, 12)
            reply = post(base, files={"image": ("a.png", png(image)), "mask": ("m.png", png(mask))},
                         data={"blend": "false"})
            answers.append(check_answer(reply, image, mask, expected))

    with ThreadPoolExecutor(3) as pool:
        clients = [pool.submit(client, seed) for seed in range(3)]
        time.sleep(1.0)
        # A newer checkpoint that does not verify (never served) and a good one older than it.
        copy_checkpoint(checkpoints / "checkpoint_000000004", run / "checkpoint_000000004")
        corrupt(run / "checkpoint_000000004")
        copy_checkpoint(checkpoints / "checkpoint_000000003", run / "checkpoint_000000003")
        deadline = time.monotonic() + 60
        while requests.get(f"{base}/v1/model", timeout=30).json()["step"] != 3:
            assert time.monotonic() < deadline, "the app did not move to checkpoint 3"
            time.sleep(0.2)
        time.sleep(2.0)  # past the follower's given-up attempts at checkpoint 4
        stop.set()
        for future in clients:
            future.result()  # re-raises a failed request
    assert "checkpoint_000000002" in answers and "checkpoint_000000003" in answers
    assert "checkpoint_000000004" not in answers
    assert requests.get(f"{base}/v1/model", timeout=30).json()["step"] == 3


# ------------------------------------------------------------------ jobs/serve.py
def test_serve_job_without_a_run_says_to_train_first(tmp_path, monkeypatch):
    from tests.cli_harness import run_cli

    monkeypatch.chdir(tmp_path)
    run_cli("serve").assert_one_line_error(r"runs/quickstart-sample.*python jobs/train\.py")
    run_cli("serve", "--checkpoint", str(tmp_path / "nothing")).assert_one_line_error("no such checkpoint")
    run_cli("serve", "--follow", "oldest").assert_one_line_error("invalid choice")


@pytest.mark.slow
@pytest.mark.ray
def test_serve_job_serves_until_ctrl_c_and_exits_0(checkpoints, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import requests

    from tests.serve_harness import REPO, free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "jobs/serve.py", "--checkpoint", str(checkpoints), "--port", str(port)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert f"http://127.0.0.1:{port}/" in lines[-1], "".join(lines)[-3000:]
        assert requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=30).json()["step"] == 4
        image, mask = png(photo(40, 50, 0)), png(hole_mask(40, 50, 5, 5, 10, 10))
        for hole in (mask, png(np.zeros((40, 50), np.uint8))):
            requests.post(f"http://127.0.0.1:{port}/v1/inpaint", files={"image": image, "mask": hole}, timeout=60)
        requests.get(f"http://127.0.0.1:{port}/favicon.ico", timeout=30)  # a browser's 404: no line of its own
        time.sleep(2)  # the replica's lines reach the driver through Ray's log monitor
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
        assert process.returncode == 0, rest[-3000:]
        assert "Traceback" not in rest, rest[-3000:]
        # The console says what happened, in our words: the model, each request, the stop; Serve's
        # controller, proxy and access log stay at warning level, and a clean exit reports no failure.
        console = "".join(lines) + rest
        assert "replica loaded " in console and "checkpoint_000000004" in console, console[-3000:]
        assert re.search(r"^POST /v1/inpaint 200: filled in \d+ ms by checkpoint_000000004$", console, re.M), console
        assert re.search(r"^POST /v1/inpaint 422: mask has no hole", console, re.M), console
        assert "stopping" in console
        for noise in ("(ProxyActor", "(ServeController", " INFO ", "graceful_shutdown failed", "favicon"):
            assert noise not in console, console[-3000:]
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_job_refuses_replicas_that_do_not_fit_a_local_machine(checkpoints, monkeypatch):
    import os

    from tests.cli_harness import run_cli

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    too_many = str((os.cpu_count() or 1) + 1)
    run_cli("serve", "--checkpoint", str(checkpoints), "--replicas", too_many).assert_one_line_error("do not fit")


def test_a_run_in_s3_is_served_and_followed(checkpoints, s3_bucket):
    from inpaint import storage

    run = f"{s3_bucket}/runs/served"
    storage.upload_dir(checkpoints / "checkpoint_000000001", f"{run}/checkpoint_000000001")
    storage.put_file(checkpoints / "config.json", f"{run}/config.json")
    service = InpaintService(ModelSlot(load_model(run)))
    assert service.model_info()["checkpoint"] == f"{run}/checkpoint_000000001"
    follower = CheckpointFollower(run, "newest", f"{run}/checkpoint_000000001")
    assert follower.poll() is None
    storage.upload_dir(checkpoints / "checkpoint_000000003", f"{run}/checkpoint_000000003")
    service.slot.swap(follower.poll())
    image, mask = photo(40, 50, 0), hole_mask(40, 50, 10, 10, 12, 20)
    assert service.answer(png(image), png(mask)).checkpoint_url == f"{run}/checkpoint_000000003"


def test_serve_job_refuses_a_port_in_use_in_one_line(checkpoints):
    import socket

    from tests.cli_harness import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        run_cli("serve", "--checkpoint", str(checkpoints), "--port", port, "--cpus", "1").assert_one_line_error(
            f"cannot listen on 127.0.0.1:{port}")


def test_serve_job_refuses_a_checkpoint_that_does_not_verify_before_starting_ray(checkpoints, tmp_path):
    from tests.cli_harness import run_cli

    shutil.copytree(checkpoints / "checkpoint_000000002", tmp_path / "checkpoint_000000002")
    corrupt(tmp_path / "checkpoint_000000002")
    run_cli("serve", "--checkpoint", str(tmp_path / "checkpoint_000000002")).assert_one_line_error("checkpoint_000000002")
