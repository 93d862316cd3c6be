"""The one TensorBoard writer, grid and hole colour (inpaint/tensorboard.py)."""

from __future__ import annotations

import torch

from inpaint.run_folder import RunPaths
from inpaint.tensorboard import RunWriter, eval_scalars, grid, show_hole


def test_the_hole_is_white_for_uint8_and_float_images_alike():
    mask = torch.ones(1, 4, 4)
    mask[:, 1:3, 1:3] = 0  # 1 = known
    for image, white in ((torch.zeros(3, 4, 4, dtype=torch.uint8), 255), (torch.zeros(3, 4, 4), 1.0)):
        shown = show_hole(image, mask)
        assert shown.dtype == image.dtype
        assert (shown[:, 1:3, 1:3] == white).all() and (shown[:, 0] == 0).all()


def test_one_grid_takes_uint8_and_float_tiles_and_pads_white():
    row = (torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8))
    picture = grid([row, row])
    assert picture.dtype == torch.uint8 and picture.shape == (3, 2 * 10 + 2, 2 * 10 + 2)
    assert (picture[:, 0, :] == 255).all() and (picture[:, 2:10, 2:10] == 0).all()


def test_the_run_writer_saves_its_grid_as_a_sample_and_its_events_in_the_run(tmp_path):
    run = RunPaths(str(tmp_path), "r")
    with RunWriter(run) as writer:
        writer.scalars({"loss/generator/g_rec": 0.5}, 3)
        target = writer.image_grid(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), 3)
    assert target == run.sample(3) and (tmp_path / "r" / "samples" / "step_00000003.png").stat().st_size > 0
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "r" / "tensorboard").iterdir())


def test_evaluation_scalars_carry_the_same_tags_for_every_method():
    document = {"metrics": {"center_1/4": {"psnr": {"mean": 21.5}, "ssim": {"mean": 0.8}}}}
    assert eval_scalars(document) == {"eval/center_1/4/psnr": 21.5, "eval/center_1/4/ssim": 0.8}
