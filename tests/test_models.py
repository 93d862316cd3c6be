"""Networks: shapes, exact parameter counts, SE behaviour, compositing, memory format, autocast."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inpaint import recipes
from inpaint.config import ModelConfig
from inpaint.models import (
    MODEL_SIZES,
    ContextDiscriminator,
    Generator,
    SEResBlock,
    SqueezeExcite,
    build_discriminator,
    build_generator,
    composite,
    count_parameters,
    make_block,
)

BLOCKS = ("se_res", "res", "conv")


# Closed-form parameter counts, written from the layer list in the module docstrings.
def conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def cbr(cin, cout, k=3):
    return conv(cin, cout, k) + bn(cout)


def linear(fin, fout):
    return fin * fout + fout


def block(kind, cin, cout, stride, r):
    if kind == "conv":
        return cbr(cin, cout, 3)
    total = cbr(cin, cout, 3) + conv(cout, cout, 3) + bn(cout)
    if stride != 1 or cin != cout:
        total += conv(cin, cout, 1) + bn(cout)
    if kind == "se_res":
        hidden = max(1, cout // r)
        total += linear(cout, hidden) + linear(hidden, cout)
    return total


def generator_params(m: ModelConfig):
    w, k, r = m.gen_width, m.block, m.se_reduction
    half = max(1, w // 2)
    return (cbr(4, w, 5) + block(k, w, 2 * w, 2, r) + block(k, 2 * w, 4 * w, 2, r)
            + (4 + len(m.dilations)) * cbr(4 * w, 4 * w)
            + conv(4 * w, 2 * w, 4) + bn(2 * w) + cbr(2 * w, 2 * w)
            + conv(2 * w, w, 4) + bn(w) + cbr(w, half) + conv(half, 3, 3, bias=True))


def ceil_halved(size, times):
    return -(-size // 2**times)


def global_params(m: ModelConfig):
    w, k, r, t = m.disc_width, m.block, m.se_reduction, m.disc_tail_stride
    side = m.image_size // 16 if t == 1 else ceil_halved(m.image_size, 6)
    return (cbr(3, w, 5) + cbr(w, 2 * w, 5) + cbr(2 * w, 4 * w, 5) + block(k, 4 * w, 8 * w, 2, r)
            + 2 * block(k, 8 * w, 8 * w, t, r) + linear(8 * w * side ** 2, m.fc_features))


def local_params(m: ModelConfig):
    w, k, r, t = m.disc_width, m.block, m.se_reduction, m.disc_tail_stride
    side = m.local_size // 8 if t == 1 else ceil_halved(m.local_size, 5)
    return (cbr(3, 2 * w, 5) + cbr(2 * w, 4 * w, 5) + block(k, 4 * w, 8 * w, 2, r)
            + 2 * block(k, 8 * w, 8 * w, t, r) + linear(8 * w * side ** 2, m.fc_features))


# arch=glcic*: GLCIC-PyTorch's layer lists (models.py there), our convs without bias (BN follows each).
def glcic_generator_params(m: ModelConfig):
    w = m.gen_width
    return (cbr(4, w, 5) + cbr(w, 2 * w) + cbr(2 * w, 2 * w) + cbr(2 * w, 4 * w)
            + (4 + len(m.dilations)) * cbr(4 * w, 4 * w)
            + conv(4 * w, 2 * w, 4) + bn(2 * w) + cbr(2 * w, 2 * w)
            + conv(2 * w, w, 4) + bn(w) + cbr(w, w // 2) + conv(w // 2, 3, 3, bias=True))


def glcic_branch_params(m: ModelConfig, size: int, convs: int):
    widths = [3] + [m.disc_width * f for f in (1, 2, 4, 8, 8, 8)[:convs]]
    return (sum(cbr(a, b, 5) for a, b in zip(widths, widths[1:]))
            + linear(widths[-1] * ceil_halved(size, convs) ** 2, m.fc_features))


def on_meta(model_cfg: ModelConfig):
    """Generator and discriminator without allocating weights (the paper's FCs hold 128 M floats)."""
    with torch.device("meta"):
        return build_generator(model_cfg), build_discriminator(model_cfg)


def hole_mask(batch, height, width, top, left, size):
    mask = torch.ones(batch, 1, height, width)
    mask[:, :, top:top + size, left:left + size] = 0
    return mask


def model_cfg(recipe: str, **fields) -> ModelConfig:
    return dataclasses.replace(recipes.get(recipe).model, **fields)


# ----------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("recipe", ["celeba", "debug"])
@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("tail_stride", [1, 2])
def test_parameter_counts_match_the_layer_list(recipe, kind, tail_stride):
    m = model_cfg(recipe, block=kind, disc_tail_stride=tail_stride)
    gen, disc = on_meta(m)
    assert count_parameters(gen) == generator_params(m)
    assert count_parameters(disc.global_net) == global_params(m)
    assert count_parameters(disc.local_net) == local_params(m)
    assert count_parameters(disc) == global_params(m) + local_params(m) + linear(2 * m.fc_features, 1)


@pytest.mark.parametrize("arch, global_convs", [("glcic", 5), ("glcic_places2", 6)])
@pytest.mark.parametrize("sizes", [{}, {"image_size": 64, "local_size": 40, "gen_width": 8, "disc_width": 8}])
def test_glcic_parameter_counts_match_its_layer_list(arch, global_convs, sizes):
    m = model_cfg("glcic", arch=arch, **sizes)
    gen, disc = on_meta(m)
    assert count_parameters(gen) == glcic_generator_params(m)
    assert count_parameters(disc.global_net) == glcic_branch_params(m, m.image_size, global_convs)
    assert count_parameters(disc.local_net) == glcic_branch_params(m, m.local_size, 5)
    assert count_parameters(disc.head) == linear(2 * m.fc_features, 1)


def test_glcic_recipe_has_glcic_pytorchs_networks():
    """Same layer list as GLCIC-PyTorch's CelebA networks (6.07 M / 39.6 M at 160 / 96 px); only its
    conv biases, which the BN after each conv makes redundant, are missing."""
    from benchmarks import glcic_pytorch as gp

    gen, disc = on_meta(recipes.get("glcic").model)
    with torch.device("meta"):
        theirs_gen, theirs_disc = gp.CompletionNetwork(), gp.ContextDiscriminator(96, 160)
    biases = [sum(m.bias.numel() for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
                  and m.bias is not None) for net in (theirs_gen, theirs_disc)]
    assert count_parameters(gen) == count_parameters(theirs_gen) - biases[0] + 3  # our last conv keeps its bias
    assert count_parameters(disc) == count_parameters(theirs_disc) - biases[1]
    assert count_parameters(gen) == pytest.approx(6.07e6, abs=0.005e6)  # published to 3 digits
    assert count_parameters(disc) == pytest.approx(39.6e6, abs=0.05e6)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 10 and all(c.stride == (2, 2) and c.kernel_size == (5, 5) for c in convs)
    theirs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.dilation)
              for m in theirs_gen.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    ours = [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.dilation)
            for m in gen.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert ours == theirs


def test_tail_stride_two_halves_the_last_discriminator_layers():
    _, disc = on_meta(model_cfg("celeba", disc_tail_stride=2))
    assert disc.global_net.features.fc.in_features == 512 * 3 * 3  # 160 / 64, rounded up
    assert disc.local_net.features.fc.in_features == 512 * 3 * 3  # 96 / 32
    assert count_parameters(disc) == 38_781_825
    with torch.device("meta"):
        assert disc(torch.rand(2, 3, 160, 160), torch.rand(2, 3, 96, 96)).shape == (2,)


def test_pinned_parameter_counts():
    gen, disc = on_meta(recipes.get("celeba").model)
    assert count_parameters(gen) == 6_711_867  # within the 6-10 M target (GLCIC-PyTorch: 6.1 M)
    assert count_parameters(disc) == 156_218_241
    gen, disc = on_meta(recipes.get("debug").model)
    assert count_parameters(gen) == 88_435
    assert count_parameters(disc) == 471_481


def test_fc_in_features_follow_image_and_local_size():
    _, disc = on_meta(recipes.get("celeba").model)
    assert disc.global_net.features.fc.in_features == 512 * 10 * 10  # 160 / 16 = 10
    assert disc.local_net.features.fc.in_features == 512 * 12 * 12  # 96 / 8 = 12
    assert disc.head.in_features == 2048
    _, disc = on_meta(recipes.get("debug").model)
    assert disc.global_net.features.fc.in_features == 64 * 2 * 2
    assert disc.local_net.features.fc.in_features == 64 * 2 * 2


def test_glcic_recipe_has_no_se_parameters():
    gen, disc = on_meta(recipes.get("glcic").model)
    for net in (gen, disc):
        assert not any(isinstance(m, (SqueezeExcite, SEResBlock)) for m in net.modules())
    gen, disc = on_meta(model_cfg("celeba", block="res"))
    assert any(isinstance(m, SEResBlock) for m in disc.modules())
    assert not any(isinstance(m, SqueezeExcite) for m in list(gen.modules()) + list(disc.modules()))


def test_model_sizes_build_and_shrink():
    counts = []
    for size in ("paper", "small", "tiny"):
        gen, disc = on_meta(model_cfg("celeba", **MODEL_SIZES[size]))
        counts.append((count_parameters(gen), count_parameters(disc)))
    assert counts[0][0] > counts[1][0] > counts[2][0]
    assert counts[0][1] > counts[1][1] > counts[2][1]


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("kind", BLOCKS)
def test_paper_size_shapes(kind):
    gen, disc = on_meta(model_cfg("celeba", block=kind))
    with torch.device("meta"):
        image, patch, mask = torch.rand(2, 3, 160, 160), torch.rand(2, 3, 96, 96), torch.ones(2, 1, 160, 160)
        assert gen(image, mask).shape == (2, 3, 160, 160)
        assert disc.global_net.features.convs(image).shape == (2, 512, 10, 10)
        assert disc.local_net.features.convs(patch).shape == (2, 512, 12, 12)
        assert disc.global_net(image).shape == (2, 1024)
        assert disc.local_net(patch).shape == (2, 1024)
        assert disc(image, patch).shape == (2,)


@pytest.mark.slow
def test_paper_size_forward_on_real_weights():
    torch.manual_seed(0)
    m = recipes.get("celeba").model
    gen, disc = build_generator(m).eval(), build_discriminator(m).eval()
    image = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        prediction = gen(image, hole_mask(1, 160, 160, 40, 50, 64))
        logits = disc(image, image[:, :, 32:128, 32:128])
    assert prediction.shape == (1, 3, 160, 160)
    assert 0 <= prediction.min() and prediction.max() <= 1
    assert logits.shape == (1,) and torch.isfinite(logits).all()


@pytest.mark.parametrize("image_size,local_size", [(16, 8), (48, 24), (64, 40), (80, 80)])
def test_discriminator_fits_any_allowed_sizes(image_size, local_size):
    torch.manual_seed(0)
    disc = build_discriminator(model_cfg("debug", image_size=image_size, local_size=local_size))
    logits = disc(torch.rand(2, 3, image_size, image_size), torch.rand(2, 3, local_size, local_size))
    assert logits.shape == (2,)
    prob = disc.probability(torch.rand(2, 3, image_size, image_size), torch.rand(2, 3, local_size, local_size))
    assert prob.shape == (2,) and ((prob > 0) & (prob < 1)).all()


def test_probability_is_sigmoid_of_logits():
    torch.manual_seed(0)
    disc = build_discriminator(recipes.get("debug").model).eval()
    images, patches = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 16, 16)
    assert torch.allclose(disc.probability(images, patches), torch.sigmoid(disc(images, patches)))


def test_discriminator_rejects_wrong_input_size():
    disc = build_discriminator(recipes.get("debug").model)
    with pytest.raises(ValueError, match="GlobalDiscriminator: expected 32x32 inputs.*got 48x48"):
        disc(torch.rand(2, 3, 48, 48), torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="LocalDiscriminator: expected 16x16 inputs.*got 24x24"):
        disc(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 24, 24))
    with pytest.raises(ValueError, match="multiple of 16"):
        ContextDiscriminator(40, 16)


@pytest.mark.parametrize("dilations", [(2, 4), (2, 4, 8, 16)])
def test_generator_non_square(dilations):
    torch.manual_seed(0)
    gen = Generator(width=8, se_reduction=4, dilations=dilations)
    prediction = gen(torch.rand(2, 3, 40, 56), hole_mask(2, 40, 56, 8, 20, 16))
    assert prediction.shape == (2, 3, 40, 56)
    assert 0 <= prediction.min() and prediction.max() <= 1


def test_generator_rejects_sizes_not_divisible_by_4():
    gen = Generator(width=8, se_reduction=4, dilations=(2,))
    with pytest.raises(ValueError, match="multiples of 4, got 42x56"):
        gen(torch.rand(1, 3, 42, 56), torch.ones(1, 1, 42, 56))


def test_make_block_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind 'dense'"):
        make_block("dense", 8, 16, 2, 4)


# ----------------------------------------------------------------------------- behaviour

def test_squeeze_excite_scales_each_channel_by_sigmoid_of_its_mean():
    se = SqueezeExcite(2, reduction=1)
    with torch.no_grad():
        for fc in (se.reduce, se.expand):
            fc.weight.copy_(torch.eye(2))
            fc.bias.zero_()
    x = torch.randn(3, 2, 5, 7)
    x[:, 0] += 1.0 - x[:, 0].mean(dim=(1, 2), keepdim=True)  # channel means: 1 and -2
    x[:, 1] += -2.0 - x[:, 1].mean(dim=(1, 2), keepdim=True)
    expected_scale = torch.sigmoid(torch.tensor([1.0, 0.0]))  # relu(-2) = 0 -> sigmoid(0)
    assert torch.allclose(se(x), x * expected_scale[None, :, None, None], atol=1e-6)


def test_squeeze_excite_bias_sets_per_channel_weights():
    se = SqueezeExcite(4, reduction=2)
    bias = torch.tensor([-3.0, 0.0, 1.0, 4.0])
    with torch.no_grad():
        se.expand.weight.zero_()
        se.expand.bias.copy_(bias)
    x = torch.randn(2, 4, 3, 3)
    assert torch.allclose(se(x), x * torch.sigmoid(bias)[None, :, None, None])


@pytest.mark.parametrize("in_ch,out_ch,stride", [(4, 4, 1), (4, 8, 2)])
def test_se_res_block_adds_the_scaled_branch_to_the_shortcut(in_ch, out_ch, stride):
    torch.manual_seed(0)
    res_block = SEResBlock(in_ch, out_ch, stride, reduction=2).eval()
    x = torch.randn(2, in_ch, 8, 8)
    with torch.no_grad():
        res_block.excite.expand.weight.zero_()
        res_block.excite.expand.bias.zero_()  # every channel scaled by sigmoid(0) = 0.5
        branch, shortcut = res_block.residual(x), res_block.shortcut(x)
        assert torch.allclose(res_block(x), torch.relu(0.5 * branch + shortcut), atol=1e-6)
        res_block.excite.expand.bias.fill_(-1e4)  # excitation 0: the branch is switched off
        assert torch.equal(res_block(x), torch.relu(shortcut))
    if stride == 1:
        assert torch.equal(res_block(x), torch.relu(x))


def test_composite_keeps_known_pixels_bit_identical():
    torch.manual_seed(0)
    gen = build_generator(recipes.get("debug").model)
    image, mask = torch.rand(2, 3, 32, 32), hole_mask(2, 32, 32, 5, 9, 12)
    prediction = gen(image, mask)
    completed = composite(image, prediction, mask)
    known = mask.expand_as(image).bool()
    assert torch.equal(completed[known], image[known])
    assert torch.equal(completed[~known], prediction[~known])


def test_generator_ignores_hidden_pixels():
    torch.manual_seed(0)
    gen = build_generator(recipes.get("debug").model).eval()
    image, mask = torch.rand(1, 3, 32, 32), hole_mask(1, 32, 32, 8, 8, 12)
    other = image.clone()
    other[:, :, 8:20, 8:20] = torch.rand(1, 3, 12, 12)
    assert torch.equal(gen(image, mask), gen(other, mask))


@pytest.mark.parametrize("kind, fields", [*((k, {}) for k in BLOCKS), ("se_res", {"disc_tail_stride": 2}),
                                          ("conv", {"arch": "glcic", "disc_tail_stride": 2}),
                                          ("conv", {"arch": "glcic_places2", "disc_tail_stride": 2})])
def test_gradients_reach_every_parameter(kind, fields):
    torch.manual_seed(0)
    m = model_cfg("debug", block=kind, **fields)
    gen, disc = build_generator(m), build_discriminator(m)
    image, mask = torch.rand(4, 3, 32, 32), hole_mask(4, 32, 32, 6, 10, 12)
    completed = composite(image, gen(image, mask), mask)
    logits = disc(completed, completed[:, :, 4:20, 8:24])
    (logits * torch.randn(4)).sum().backward()
    for name, param in list(gen.named_parameters()) + list(disc.named_parameters()):
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    m = recipes.get("debug").model
    gen, disc = build_generator(m), build_discriminator(m)
    image, mask = torch.rand(2, 3, 32, 32), hole_mask(2, 32, 32, 4, 4, 12)
    patch = image[:, :, 8:24, 8:24].contiguous()
    with torch.no_grad():
        expected = gen(image, mask), disc(image, patch)
        gen.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
        cl = {"memory_format": torch.channels_last}
        actual = gen(image.to(**cl), mask.to(**cl)), disc(image.to(**cl), patch.to(**cl))
    assert torch.allclose(actual[0], expected[0], atol=1e-5)
    assert torch.allclose(actual[1], expected[1], atol=1e-4, rtol=1e-4)


def test_bfloat16_autocast_on_cpu():
    torch.manual_seed(0)
    m = recipes.get("debug").model
    gen, disc = build_generator(m).eval(), build_discriminator(m).eval()
    image, mask = torch.rand(2, 3, 32, 32), hole_mask(2, 32, 32, 4, 4, 12)
    with torch.no_grad():
        expected = gen(image, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = gen(image, mask)
            logits = disc(composite(image, prediction, mask), image[:, :, 8:24, 8:24])
    assert prediction.dtype == torch.bfloat16
    assert torch.allclose(prediction.float(), expected, atol=0.05)
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_discriminator_fc_runs_in_fp32_under_autocast_unless_switched_off():
    m = recipes.get("debug").model
    torch.manual_seed(0)
    default = build_discriminator(m).eval()
    bf16_fc = build_discriminator(m, fc_fp32=False).eval()
    bf16_fc.load_state_dict(default.state_dict())  # the switch changes no weight or state-dict key
    assert default.global_net.features.fc_fp32 and default.local_net.features.fc_fp32
    assert not bf16_fc.global_net.features.fc_fp32 and not bf16_fc.local_net.features.fc_fp32
    image = torch.rand(2, 3, 32, 32)
    patch = image[:, :, 8:24, 8:24].contiguous()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_features = default.global_net(image), default.local_net(patch)
        bf16_features = bf16_fc.global_net(image), bf16_fc.local_net(patch)
    assert all(f.dtype == torch.float32 for f in fp32_features)
    assert all(f.dtype == torch.bfloat16 for f in bf16_features)
    with torch.no_grad():  # without autocast the switch changes nothing
        assert torch.equal(default(image, patch), bf16_fc(image, patch))
