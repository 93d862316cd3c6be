"""Each change this benchmark motivated, timed alone before vs after, and what bf16 does to L_CX."""

from __future__ import annotations

from typing import Any, Callable

import torch

from benchmarks.runners import Runner, attach_loader, interleaved_medians
from benchmarks.vocabulary import OPTIMIZED, Options
from benchmarks.workloads import STRAIGHTFORWARD_SETTINGS, Workload
from inpaint.config import Config
from inpaint.losses import contextual_loss
from inpaint.models import build_discriminator


def code_changes(options: Options, device: torch.device, url: str) -> dict[str, Any]:
    """This issue's code changes, each before vs after in isolation, at the largest recipe measured."""
    recipe = "celeba" if "celeba" in options.recipes else options.recipes[0]
    config = Workload(recipe, recipe, OPTIMIZED).config("joint", options.overrides)
    torch.set_flush_denormal(device.type == "cpu")  # as the Trainer runs
    changes = {"recipe": recipe, "fused_adam": fused_adam_gain(config, options, device),
               "fp32_discriminator_fc": fp32_fc_gain(config, options, device)}
    if device.type == "cpu":
        changes["flush_denormal"] = flush_denormal_gain(recipe, options, device, url)
    return changes


def fused_adam_gain(config: Config, options: Options, device: torch.device) -> dict[str, Any]:
    """The discriminator's Adam step, PyTorch's default foreach implementation vs the fused one."""
    parameters = list(build_discriminator(config.model).to(device).parameters())
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    adam = {name: torch.optim.Adam(parameters, lr=1e-4, **kwargs)
            for name, kwargs in (("foreach Adam (before)", {"foreach": True}), ("fused Adam (after)", {"fused": True}))}
    seconds = interleaved_medians({name: optimizer.step for name, optimizer in adam.items()}, options.steps, device)
    size = sum(p.numel() for p in parameters) / 1e6
    return {"what": f"discriminator optimizer step, {len(parameters)} tensors, {size:.1f} M parameters",
            "seconds": seconds}


def fp32_fc_gain(config: Config, options: Options, device: torch.device) -> dict[str, Any]:
    """Discriminator forward + backward under bf16 autocast with its FC layers in bf16 vs in fp32.

    The same weights twice: the discriminator as built (FC in fp32) and one built with
    ``fc_fp32=False`` (autocast runs its FC layers in bf16, as before the change) that holds the
    first one's parameter and buffer tensors themselves, so both read the same memory.
    """
    torch.manual_seed(0)
    after = build_discriminator(config.model).to(device, memory_format=torch.channels_last)
    with torch.device("meta"):
        before = build_discriminator(config.model, fc_fp32=False)
    before.load_state_dict(after.state_dict(keep_vars=True), assign=True)
    batch, size, local = 2 * config.data.batch_size, config.model.image_size, config.model.local_size
    images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    patches = torch.rand(batch, 3, local, local, device=device).contiguous(memory_format=torch.channels_last)

    def forward_backward(discriminator: torch.nn.Module) -> Callable[[], None]:
        def call() -> None:
            discriminator.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = discriminator(images, patches)
            logits.float().mean().backward()
        return call

    seconds = interleaved_medians({"FC under bf16 autocast (before)": forward_backward(before),
                                   "FC in fp32 (after)": forward_backward(after)}, options.steps, device)
    return {"what": f"discriminator forward + backward, batch {batch} (real + completed), bf16 autocast, "
                    "channels_last", "seconds": seconds}


def flush_denormal_gain(recipe: str, options: Options, device: torch.device, url: str) -> dict[str, Any]:
    """A generator-phase step in fp32 with denormals kept vs flushed to zero (the Trainer flushes them).

    On photographs: their exact matches outside the hole are what drive the contextual loss's
    softmax tails, and with them the gradients, into the denormal range; random pixels do not.
    """
    runner = Runner(Workload(recipe, recipe, OPTIMIZED, STRAIGHTFORWARD_SETTINGS), "generator", device, options)
    attach_loader(runner, url)
    batch_tensors = next(runner.batches)

    def step(flush: bool) -> Callable[[], None]:
        def call() -> None:
            runner.flush_denormal = flush
            runner.step(batch_tensors)
        return call

    seconds = interleaved_medians({"denormals kept (before)": step(False), "flushed to zero (after)": step(True)},
                                  options.steps, device)
    torch.set_flush_denormal(True)  # as the Trainer leaves it
    return {"what": f"generator-phase step, batch {runner.config.data.batch_size} of photographs, fp32, NCHW, "
                    "fused contextual loss",
            "seconds": seconds}


def contextual_precision(device: torch.device, batch: int = 4, size: int = 160) -> dict[str, Any]:
    """L_CX from bf16-autocast VGG16 features vs fp32 ones, on photographs and their completions."""
    import skimage.data

    from inpaint.vgg import VGG16Features

    photos = [torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
              for name in ("astronaut", "chelsea", "coffee", "rocket")[:batch]]
    originals = torch.stack([torch.nn.functional.interpolate(p[None], size=(size, size), mode="area")[0]
                             for p in photos]).to(device)
    # A plausible completion: the centre quarter replaced by a blurred copy of itself.
    completed = originals.clone()
    hole = slice(size // 4, 3 * size // 4)
    blurred = torch.nn.functional.avg_pool2d(originals, 9, stride=1, padding=4)
    completed[:, :, hole, hole] = blurred[:, :, hole, hole]
    torch.manual_seed(0)
    vgg = VGG16Features(("relu3_3",), weights="random").to(device)
    losses = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                x, y = vgg(completed)["relu3_3"], vgg(originals)["relu3_3"]
            losses[str(dtype).split(".")[1]] = contextual_loss(x.float(), y.float()).cpu()
    diff = (losses["bfloat16"] - losses["float32"]).abs()
    return {"layer": "relu3_3", "images": batch, "vgg_weights": "random (no download here; ImageNet weights "
            "give other feature statistics)", "loss_fp32": losses["float32"].tolist(),
            "loss_bf16": losses["bfloat16"].tolist(), "max_abs_diff": diff.max().item(),
            "max_rel_diff": (diff / losses["float32"].abs()).max().item()}
