"""Losses (reconstruction, adversarial, contextual) and the VGG16 feature extractor."""

from __future__ import annotations

import math
import urllib.error

import fsspec
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from inpaint.losses import (
    contextual_loss,
    contextual_loss_reference,
    discriminator_loss,
    generator_adversarial_loss,
    reconstruction_loss,
)
from inpaint.vgg import VGG_LAYER_INDEX, VGG16Features, VGGWeightsError, load_vgg16_state_dict


def contextual_loss_float64(x_feat, y_feat, band_width=0.5, eps=1e-5):
    """The task's formula, written out independently, in float64."""
    x = x_feat.double().flatten(2)
    y = y_feat.double().flatten(2)
    mu_y = y.mean(dim=2, keepdim=True)  # per image, over y's positions
    x_c, y_c = x - mu_y, y - mu_y
    cosine = torch.einsum("bci,bcj->bij", x_c, y_c) / (
        x_c.norm(dim=1).unsqueeze(2) * y_c.norm(dim=1).unsqueeze(1))
    d = 1 - cosine
    d_tilde = d / (d.min(dim=2, keepdim=True).values + eps)
    w = torch.exp((1 - d_tilde) / band_width)
    cx = w / w.sum(dim=2, keepdim=True)
    return -torch.log(cx.max(dim=1).values.mean(dim=1))


def loss_and_grads(loss_fn, x, y, **kwargs):
    """Per-image losses and the gradients of a weighted sum of them wrt x and y."""
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    loss = loss_fn(x, y, **kwargs)
    # Distinct weights per image check that each image's gradient is scaled by its own upstream grad.
    weights = torch.arange(1, loss.shape[0] + 1, dtype=loss.dtype)
    grad_x, grad_y = torch.autograd.grad((loss * weights).sum(), [x, y])
    return loss.detach(), grad_x, grad_y


# ---------------------------------------------------------------- contextual loss


@pytest.mark.parametrize("shape", [(2, 8, 5, 6), (3, 4, 7, 3)])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_contextual_loss_matches_float64_formula(shape, chunk):
    torch.manual_seed(0)
    x, y = torch.randn(shape), torch.randn(shape)
    expected, expected_gx, expected_gy = loss_and_grads(contextual_loss_float64, x.double(), y.double())
    loss, grad_x, grad_y = loss_and_grads(contextual_loss, x, y, chunk=chunk)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_x.double(), expected_gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_y.double(), expected_gy, rtol=1e-4, atol=1e-5)


def test_contextual_loss_band_width_and_eps_are_used():
    torch.manual_seed(1)
    x, y = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    for kwargs in ({"band_width": 0.1}, {"band_width": 2.0, "eps": 0.5}):
        expected, expected_gx, _ = loss_and_grads(contextual_loss_float64, x.double(), y.double(), **kwargs)
        loss, grad_x, _ = loss_and_grads(contextual_loss, x, y, **kwargs)
        torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(grad_x.double(), expected_gx, rtol=1e-4, atol=1e-5)


def test_reference_matches_float64_formula():
    torch.manual_seed(2)
    x, y = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    expected, expected_gx, expected_gy = loss_and_grads(contextual_loss_float64, x.double(), y.double())
    loss, grad_x, grad_y = loss_and_grads(contextual_loss_reference, x, y)
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_x.double(), expected_gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_y.double(), expected_gy, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_fn", [contextual_loss, contextual_loss_reference])
def test_contextual_loss_centres_each_image_on_its_own_mean(loss_fn):
    torch.manual_seed(3)
    x, y = torch.randn(2, 8, 4, 5), torch.randn(2, 8, 4, 5)
    before = loss_fn(x, y)
    x2, y2 = x.clone(), y.clone()
    x2[1] = torch.randn(8, 4, 5) + 5.0  # a batch-wide mean would move with image 1
    y2[1] = torch.randn(8, 4, 5) + 5.0
    after = loss_fn(x2, y2)
    assert after[0].item() == pytest.approx(before[0].item(), abs=1e-6)
    assert after[1].item() != pytest.approx(before[1].item(), abs=1e-3)


@pytest.mark.parametrize("loss_fn", [contextual_loss, contextual_loss_reference])
def test_contextual_loss_of_identical_features_is_zero_with_finite_gradient(loss_fn):
    torch.manual_seed(4)
    y = torch.relu(torch.randn(2, 16, 6, 7))
    x = y.clone().requires_grad_()
    loss = loss_fn(x, y)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert torch.exp(-loss).min().item() > 0.9999  # CX close to 1


def test_contextual_loss_on_mostly_identical_pair_is_finite_and_accurate():
    torch.manual_seed(5)
    y = torch.relu(torch.randn(2, 16, 10, 10))
    x = y.clone()
    x[:, :, 3:6, 4:8] = torch.relu(torch.randn(2, 16, 3, 4))  # the "hole"; the rest is copied exactly
    expected, expected_gx, expected_gy = loss_and_grads(contextual_loss_float64, x.double(), y.double())
    for loss_fn in (contextual_loss, contextual_loss_reference):
        loss, grad_x, grad_y = loss_and_grads(loss_fn, x, y)
        assert torch.isfinite(grad_x).all() and torch.isfinite(grad_y).all()
        assert (loss > 0).all()
        torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(grad_x.double(), expected_gx, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad_y.double(), expected_gy, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_fn", [contextual_loss, contextual_loss_reference])
def test_contextual_loss_with_zero_centred_vectors_is_finite(loss_fn):
    torch.manual_seed(6)
    # y constant over positions: every y_j - mu_y is the zero vector, so all cosines are 0 and
    # CX is uniform, 1 / N per entry.
    y = torch.ones(1, 4, 3, 3) * torch.randn(1, 4, 1, 1)
    x = torch.randn(1, 4, 3, 3)
    x[..., 0, 0] = y[..., 0, 0]  # and one x_i - mu_y is zero too
    x.requires_grad_()
    loss = loss_fn(x, y)
    loss.sum().backward()
    assert loss.item() == pytest.approx(math.log(9), abs=1e-5)
    assert torch.isfinite(x.grad).all()


def test_contextual_loss_stays_fp32_under_bf16_autocast():
    torch.manual_seed(7)
    x, y = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    expected, expected_gx, _ = loss_and_grads(contextual_loss, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad_x, _ = loss_and_grads(contextual_loss, x, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad_x, expected_gx)


def test_contextual_loss_gradient_wrt_x_alone():
    torch.manual_seed(8)
    x, y = torch.randn(3, 6, 4, 5), torch.randn(3, 6, 4, 5)
    _, expected_gx, _ = loss_and_grads(contextual_loss_float64, x.double(), y.double())
    x.requires_grad_()
    (contextual_loss(x, y, chunk=2) * torch.arange(1, 4)).sum().backward()  # y is a fixed target
    torch.testing.assert_close(x.grad.double(), expected_gx, rtol=1e-4, atol=1e-5)


def test_contextual_loss_without_grad_and_bad_arguments():
    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        assert contextual_loss(x, y).shape == (2,)
    with pytest.raises(ValueError, match="chunk"):
        contextual_loss(x, y, chunk=0)
    with pytest.raises(ValueError, match="one shape"):
        contextual_loss(x, y[:, :, :2])


# ---------------------------------------------------------------- reconstruction and adversarial


@pytest.fixture
def reconstruction_example():
    """Two 1-channel 2x2 images against a zero target; image 0 has a 1-pixel hole, image 1 a 2-pixel one."""
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]], [[[0.0, 0.0], [1.0, 1.0]]]])
    return prediction, torch.zeros_like(prediction), mask


def test_reconstruction_hole_is_normalised_per_image_by_hole_size(reconstruction_example):
    prediction, target, mask = reconstruction_example
    # image 0: 16 / 1 pixel; image 1: (4 + 4) / 2 pixels. (Pooling the batch would give 24 / 3.)
    assert reconstruction_loss(prediction, target, mask).item() == pytest.approx((16 + 4) / 2)
    assert reconstruction_loss(prediction, target, mask, masking="hole").item() == pytest.approx(10.0)


def test_reconstruction_hole_ignores_known_pixels(reconstruction_example):
    prediction, target, mask = reconstruction_example
    changed = prediction + 100 * mask
    assert reconstruction_loss(changed, target, mask).item() == pytest.approx(10.0)


def test_reconstruction_full_is_plain_mse(reconstruction_example):
    prediction, target, mask = reconstruction_example
    assert reconstruction_loss(prediction, target, mask, masking="full").item() == pytest.approx((30 + 16) / 8)


def test_reconstruction_weighted(reconstruction_example):
    prediction, target, mask = reconstruction_example
    # image 0: known 1+4+9 weight 3, hole 3*16 weight 3; image 1: known 4+4 weight 2, hole 3*(4+4) weight 6.
    expected = ((14 + 48) / 6 + (8 + 24) / 8) / 2
    got = reconstruction_loss(prediction, target, mask, masking="weighted", hole_weight=3.0)
    assert got.item() == pytest.approx(expected)
    unit = reconstruction_loss(prediction, target, mask, masking="weighted", hole_weight=1.0)
    assert unit.item() == pytest.approx((30 / 4 + 16 / 4) / 2)


def test_reconstruction_broadcasts_single_channel_mask_and_rejects_unknown_mode(reconstruction_example):
    prediction, target, mask = reconstruction_example
    rgb = prediction.expand(-1, 3, -1, -1)
    assert reconstruction_loss(rgb, target.expand(-1, 3, -1, -1), mask).item() == pytest.approx(10.0)
    assert reconstruction_loss(prediction, target, mask.bool()).item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="masking"):
        reconstruction_loss(prediction, target, mask, masking="bogus")


def test_generator_adversarial_loss_is_non_saturating_bce():
    logits = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    expected = -torch.log(torch.sigmoid(logits.double())).mean()
    assert generator_adversarial_loss(logits).item() == pytest.approx(expected.item(), rel=1e-6)
    assert generator_adversarial_loss(torch.tensor([-200.0])).item() == pytest.approx(200.0)


def test_discriminator_loss_is_bce_real_one_fake_zero():
    real = torch.tensor([[1.5], [-0.3], [0.2]])
    fake = torch.tensor([[-2.0], [0.7], [0.1]])
    expected = (-torch.log(torch.sigmoid(real.double())).mean()
                - torch.log(1 - torch.sigmoid(fake.double())).mean())
    assert discriminator_loss(real, fake).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(discriminator_loss(torch.tensor([-200.0]), torch.tensor([200.0])))


# ---------------------------------------------------------------- VGG16


@pytest.fixture(scope="module")
def torchvision_vgg16():
    """A randomly initialised torchvision VGG16: the layout and format our loader must accept."""
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def features_only_file(torchvision_vgg16, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.pth"
    torch.save(torchvision_vgg16.features.state_dict(), path)
    return path


def assert_same_features(state, torchvision_vgg16):
    expected = torchvision_vgg16.features.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.slow
def test_load_full_vgg16_state_dict_from_fsspec_url(torchvision_vgg16):
    url = "memory://weights/vgg16.pth"
    with fsspec.open(url, "wb") as handle:
        torch.save(torchvision_vgg16.state_dict(), handle)
    try:
        assert_same_features(load_vgg16_state_dict(url), torchvision_vgg16)
    finally:
        fsspec.filesystem("memory").rm(url)


def test_load_features_only_state_dict_from_local_file(features_only_file, torchvision_vgg16):
    assert_same_features(load_vgg16_state_dict(str(features_only_file)), torchvision_vgg16)


def test_load_safetensors_file(torchvision_vgg16, tmp_path):
    path = tmp_path / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision_vgg16.features.state_dict().items()}, str(path))
    assert_same_features(load_vgg16_state_dict(str(path)), torchvision_vgg16)


def test_random_weights_spec_gives_none():
    assert load_vgg16_state_dict("random") is None


def test_missing_weights_file(tmp_path):
    with pytest.raises(VGGWeightsError, match="not found.*loss.vgg_weights="):
        load_vgg16_state_dict(str(tmp_path / "absent.pth"))


def test_garbage_weights_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(VGGWeightsError, match="not a readable VGG16 state dict"):
        load_vgg16_state_dict(str(path))


def test_unreadable_url():
    with pytest.raises(VGGWeightsError, match="cannot read VGG16 weights from nosuchproto://"):
        load_vgg16_state_dict("nosuchproto://bucket/vgg16.pth")


def test_wrong_shapes_and_keys_are_rejected(torchvision_vgg16, tmp_path):
    state = dict(torchvision_vgg16.features.state_dict())
    state["0.weight"] = torch.zeros(32, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(VGGWeightsError, match=r"0.weight has shape \(32, 3, 3, 3\), VGG16 needs \(64, 3, 3, 3\)"):
        load_vgg16_state_dict(str(tmp_path / "shape.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "keys.pth")
    with pytest.raises(VGGWeightsError, match="not a torchvision VGG16 state dict"):
        load_vgg16_state_dict(str(tmp_path / "keys.pth"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(VGGWeightsError, match="expected a VGG16 state dict"):
        load_vgg16_state_dict(str(tmp_path / "tensor.pth"))


def test_imagenet_download_failure_says_how_to_provide_a_file(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the weights must be downloaded
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(VGGWeightsError, match=r"ImageNet.*no route to host.*--set loss.vgg_weights=.*random") as info:
        load_vgg16_state_dict("imagenet")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("size", [160, 32])
def test_vgg_feature_shapes_per_layer(size):
    torch.manual_seed(0)
    layers = tuple(VGG_LAYER_INDEX)
    vgg = VGG16Features(layers=layers, weights="random")
    outputs = vgg(torch.rand(1, 3, size, size))
    assert list(outputs) == list(layers)
    channels = {"relu1_2": 64, "relu2_2": 128, "relu3_3": 256, "relu4_3": 512, "relu5_3": 512}
    strides = {"relu1_2": 1, "relu2_2": 2, "relu3_3": 4, "relu4_3": 8, "relu5_3": 16}
    for name, features in outputs.items():
        assert features.shape == (1, channels[name], size // strides[name], size // strides[name])


def test_vgg_is_truncated_after_deepest_layer():
    assert len(VGG16Features(layers=("relu2_2",), weights="random").features) == VGG_LAYER_INDEX["relu2_2"] + 1
    vgg = VGG16Features(layers=("relu3_3", "relu1_2"), weights="random")
    assert len(vgg.features) == VGG_LAYER_INDEX["relu3_3"] + 1
    assert list(vgg(torch.rand(1, 3, 16, 16))) == ["relu3_3", "relu1_2"]
    with pytest.raises(ValueError, match="relu9_9"):
        VGG16Features(layers=("relu9_9",), weights="random")


def test_vgg_applies_imagenet_normalisation_and_matches_torchvision(features_only_file, torchvision_vgg16):
    vgg = VGG16Features(layers=("relu1_2", "relu3_3"), weights=str(features_only_file))
    images = torch.rand(2, 3, 24, 20)
    normalised = torchvision.transforms.functional.normalize(images, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    outputs = vgg(images)
    with torch.no_grad():
        torch.testing.assert_close(outputs["relu1_2"], torchvision_vgg16.features[:4](normalised))
        torch.testing.assert_close(outputs["relu3_3"], torchvision_vgg16.features[:16](normalised))
        assert not torch.allclose(outputs["relu1_2"], torchvision_vgg16.features[:4](images))


def test_vgg_is_frozen_and_always_in_eval_mode():
    vgg = VGG16Features(layers=("relu2_2",), weights="random")
    assert not any(p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training and not any(m.training for m in vgg.modules())
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    vgg(images)["relu2_2"].sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert all(p.grad is None for p in vgg.parameters())
