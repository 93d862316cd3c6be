"""Frozen VGG16 feature extractor for the contextual loss.

Layers: the contextual loss uses ``relu3_3`` by default. At the paper's 160 px it is a 40 x 40
map (N = 1600 positions) of mid-level texture and structure at 1/4 resolution, the scale of the
generator's bottleneck. Deeper layers have too few positions at 160 px for a meaningful
distribution (relu4_3: 400, relu5_3: 100); shallower ones are near-pixel features that duplicate
the L2 reconstruction term and cost more, since the loss compares every pair of positions:
N^2 grows 16x per halving of the stride (relu2_2: 6,400 positions, 41M pairs per image).

The network mirrors ``torchvision.models.vgg16().features`` index for index, so torchvision
state dicts load unchanged, and stops after the deepest requested layer.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from inpaint import storage
from inpaint.config import VGG_LAYERS
from inpaint.errors import one_line

# Indices into torchvision's vgg16().features of the ReLU closing each conv stage.
VGG_LAYER_INDEX = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}

# Configuration "D" of Simonyan & Zisserman: conv widths, "M" = 2x2 max pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's VGG16_Weights.IMAGENET1K_V1 file, with its published SHA-256 and size. torchvision's own
# loader unpickles the torch hub cache without any check, so a file planted there ran its code; this
# module reads it only after checking the full hash, and then only as tensors (weights_only=True).
IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
IMAGENET_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"
IMAGENET_BYTES = 553_433_881
_HOW_TO_PROVIDE = ("pass a torchvision VGG16 state dict with --set loss.vgg_weights=/path/or/s3://.../vgg16.pth, "
                   "or --set loss.vgg_weights=random for tests")


class VGGWeightsError(RuntimeError):
    """VGG16 weights could not be found, read or matched to the network; the message says which."""


def _vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features layout, initialised as torchvision does, without the 100M-weight classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for width in _VGG16_LAYOUT:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
        channels = width
    return nn.Sequential(*layers)


def _expected_shapes() -> dict[str, torch.Size]:
    """Parameter shapes of vgg16().features, keyed as its state dict ("0.weight", ...)."""
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in _vgg16_features().state_dict().items()}


def _features_only(state: object, source: str) -> dict[str, Tensor]:
    """Check a full-vgg16 or features-only state dict; return its features, keyed "0.weight", ..."""
    if not isinstance(state, dict):
        raise VGGWeightsError(f"{source}: expected a VGG16 state dict, found a {type(state).__name__}")
    expected = _expected_shapes()
    prefix = "features." if any(str(key).startswith("features.") for key in state) else ""
    features = {key: state.get(prefix + key) for key in expected}
    missing = [prefix + key for key, value in features.items() if not isinstance(value, Tensor)]
    if missing:
        raise VGGWeightsError(f"{source}: not a torchvision VGG16 state dict ({len(missing)} of "
                              f"{len(expected)} conv tensors missing, e.g. {missing[0]!r})")
    for key, tensor in features.items():
        if tensor.shape != expected[key]:
            raise VGGWeightsError(f"{source}: {prefix}{key} has shape {tuple(tensor.shape)}, "
                                  f"VGG16 needs {tuple(expected[key])}")
    return features


def imagenet_cache_path() -> Path:
    """Where the ImageNet weights are cached: the torch hub cache ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_URL.rsplit("/", 1)[1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _check_imagenet_file(path: Path) -> None:
    """Raise unless ``path`` is byte for byte the published file (size first: cheap, then SHA-256)."""
    size = path.stat().st_size
    digest = _sha256(path) if size == IMAGENET_BYTES else None
    if digest != IMAGENET_SHA256:
        found = f"SHA-256 {digest[:16]}..." if digest else f"{size} bytes"
        raise VGGWeightsError(f"{path} is not torchvision's ImageNet VGG16 file ({found}, expected SHA-256 "
                              f"{IMAGENET_SHA256[:16]}... of {IMAGENET_BYTES} bytes); it was not loaded. "
                              f"Delete it to download again, or {_HOW_TO_PROVIDE}")


def _download_imagenet() -> dict[str, Tensor]:
    """torchvision's ImageNet VGG16 weights from the torch hub cache (downloaded there first if absent).

    The file is loaded only when its full SHA-256 matches the published one, and then with
    ``weights_only=True``: neither a file planted in the cache nor a tampered download runs code.
    """
    path = imagenet_cache_path()
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            try:
                torch.hub.download_url_to_file(IMAGENET_URL, str(partial), progress=True)
                _check_imagenet_file(partial)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        else:
            _check_imagenet_file(path)
    except VGGWeightsError:
        raise
    except Exception as error:  # network, proxy and disk errors all mean "not available here"
        raise VGGWeightsError(f"cannot download the ImageNet VGG16 weights ({one_line(error, 1000)}); "
                              f"{_HOW_TO_PROVIDE}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise VGGWeightsError(f"{path}: not a readable VGG16 state dict ({one_line(error, 200)})") from None


def _read_file(spec: str) -> object:
    """Load a state dict (torch.save or safetensors) from a local path or any fsspec URL."""
    try:
        payload = storage.read_bytes(spec)
    except storage.MissingObject:
        raise VGGWeightsError(f"VGG16 weights file not found: {spec}; {_HOW_TO_PROVIDE}") from None
    except storage.StorageError as error:  # unknown protocol, credentials, unreachable storage, a directory...
        raise VGGWeightsError(f"cannot read VGG16 weights from {spec}: {error}") from None
    try:
        if spec.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors
            return load_safetensors(payload)
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:
        raise VGGWeightsError(f"{spec}: not a readable VGG16 state dict ({one_line(error, 200)})") from None


def load_vgg16_state_dict(spec: str) -> dict[str, Tensor] | None:
    """VGG16 conv weights for ``spec``: "imagenet", "random" (None: keep the random init), or a path/URL.

    Returns the features-only state dict (keys "0.weight", "0.bias", ... of vgg16().features);
    files may hold a full vgg16 state dict or a features-only one.
    """
    if spec == "random":
        return None
    if spec == "imagenet":
        return _features_only(_download_imagenet(), "ImageNet VGG16 weights")
    return _features_only(_read_file(spec), spec)


class VGG16Features(nn.Module):
    """Frozen, always-eval VGG16 returning the requested ReLU outputs of images in [0, 1]."""

    def __init__(self, layers: tuple[str, ...] | list[str] = ("relu3_3",), weights: str = "imagenet") -> None:
        super().__init__()
        unknown = [name for name in layers if name not in VGG_LAYER_INDEX]
        if not layers or unknown:
            raise ValueError(f"VGG16 layers must be a non-empty list from {', '.join(VGG_LAYERS)}, got {list(layers)}")
        self.layers = tuple(layers)
        deepest = max(VGG_LAYER_INDEX[name] for name in self.layers)
        self.features = _vgg16_features()[: deepest + 1]
        state = load_vgg16_state_dict(weights)
        if state is not None:
            kept = {key: value for key, value in state.items() if int(key.split(".")[0]) <= deepest}
            self.features.load_state_dict(kept)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG16Features":
        """Stay in eval mode whatever the enclosing model does: this network is never trained."""
        return super().train(False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Map (B, 3, H, W) images in [0, 1] to {layer name: (B, C, H', W') features}."""
        wanted = {VGG_LAYER_INDEX[name]: name for name in self.layers}
        x = (images - self.mean) / self.std
        outputs = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in wanted:
                outputs[wanted[index]] = x
        return {name: outputs[name] for name in self.layers}
