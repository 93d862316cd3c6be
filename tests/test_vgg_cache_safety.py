"""The ImageNet VGG16 weights are read from the torch hub cache only as tensors, after a full hash check.

torchvision's ``VGG16_Weights.get_state_dict`` unpickles ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``
with no hash check, so a file planted there ran its code (issue 13). These tests plant such a file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from inpaint import vgg
from inpaint.vgg import VGG16Features, VGGWeightsError, imagenet_cache_path, load_vgg16_state_dict

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this writes a marker file: the stand-in for an attacker's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = torchvision.models.vgg16(weights=None).features.state_dict()
    torch.save({**{f"features.{k}": v for k, v in state.items()}, "payload": _Payload(marker)}, path)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty torch hub cache (TORCH_HOME in tmp_path); the network is never used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("the test must not download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return imagenet_cache_path()


def test_cache_path_is_where_torchvision_looks(hub, tmp_path):
    assert hub == tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"


def test_the_payload_would_run_if_unpickled(tmp_path):
    """Sanity check of the test itself: a plain (pickle) load of the planted file runs its code."""
    marker = tmp_path / "marker"
    _plant(tmp_path / "planted.pth", marker)
    torch.load(tmp_path / "planted.pth", weights_only=False)
    assert marker.read_text() == "pwned"


def test_planted_cache_file_is_never_unpickled(hub, tmp_path):
    marker = tmp_path / "marker"
    _plant(hub, marker)
    with pytest.raises(VGGWeightsError, match="not torchvision's ImageNet VGG16 file.*not loaded") as info:
        load_vgg16_state_dict("imagenet")
    assert "\n" not in str(info.value)
    with pytest.raises(VGGWeightsError):
        VGG16Features(weights="imagenet")
    assert not marker.exists()


def test_payload_with_a_matching_hash_is_still_not_executed(hub, tmp_path, monkeypatch):
    """Even if the hash check were fooled, the file is read with weights_only=True."""
    marker = tmp_path / "marker"
    _plant(hub, marker)
    data = hub.read_bytes()
    monkeypatch.setattr(vgg, "IMAGENET_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(vgg, "IMAGENET_BYTES", len(data))
    with pytest.raises(VGGWeightsError, match="not a readable VGG16 state dict"):
        load_vgg16_state_dict("imagenet")
    assert not marker.exists()


def test_verified_cache_file_loads(hub, monkeypatch):
    model = torchvision.models.vgg16(weights=None)
    hub.parent.mkdir(parents=True)
    torch.save(model.state_dict(), hub)
    data = hub.read_bytes()
    monkeypatch.setattr(vgg, "IMAGENET_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(vgg, "IMAGENET_BYTES", len(data))
    state = load_vgg16_state_dict("imagenet")
    assert torch.equal(state["0.weight"], model.features[0].weight)


def test_download_is_checked_before_it_enters_the_cache(hub, monkeypatch, tmp_path):
    marker = tmp_path / "marker"

    def tampered_download(url, dst, *args, **kwargs):
        assert url == vgg.IMAGENET_URL
        _plant(Path(dst), marker)

    monkeypatch.setattr(torch.hub, "download_url_to_file", tampered_download)
    with pytest.raises(VGGWeightsError, match="not torchvision's ImageNet VGG16 file"):
        load_vgg16_state_dict("imagenet")
    assert not marker.exists()
    assert list(hub.parent.iterdir()) == []  # neither the file nor a partial download stays behind

    model = torchvision.models.vgg16(weights=None)
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    monkeypatch.setattr(vgg, "IMAGENET_SHA256", hashlib.sha256(good.read_bytes()).hexdigest())
    monkeypatch.setattr(vgg, "IMAGENET_BYTES", good.stat().st_size)
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, *a, **k: Path(dst).write_bytes(good.read_bytes()))
    assert torch.equal(load_vgg16_state_dict("imagenet")["0.weight"], model.features[0].weight)
    assert hub.read_bytes() == good.read_bytes()


@pytest.mark.slow
def test_train_cli_refuses_a_planted_cache_file(tmp_path, sample_dataset):
    """The celeba/lfw default (loss.vgg_weights=imagenet) through jobs/train.py: one error line, no code run."""
    marker = tmp_path / "marker"
    torch_home = tmp_path / "torch"
    _plant(torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth", marker)
    runs = tmp_path / "runs"
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--storage", str(runs),
                           "--data", sample_dataset,
                           "--set", "loss.vgg_weights=imagenet", "--set", "loss.cx_weight=0.004"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "not loaded" in errors[0], proc.stderr
    assert not marker.exists()
    assert not runs.exists()
