"""How the averaged generator and the quick start's learning-rate schedule behave: one quick-start-shaped run.

    python benchmarks/ema_lr_probe.py                                         # the quickstart recipe as it is
    python benchmarks/ema_lr_probe.py --set optim.warmup_steps=0 --set optim.decay=constant   # config overrides

Trains the ``quickstart`` recipe's phases (2000 generator, 100 discriminator, 400 joint steps) in
this process (one worker, batch 8: half the quick start's global batch), keeps moving averages of
the generator at decays 0.98, 0.99 and 0.995 beside the recipe's own, and evaluates the trained
weights and each average on the sample's held-out tiles (every protocol hole kind, raw and
post-processed) at step 1500, at the end of the generator phase and every 50 joint steps. Prints
one line per evaluation, then per network the swing (the standard deviation of successive changes
in hole PSNR from the end of the discriminator phase on, averaged over hole kinds) and where it ends.
About 3-4 CPU minutes on one core of the 2-core AMD EPYC.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from inpaint import evaluation as ev  # noqa: E402
from inpaint import recipes  # noqa: E402
from inpaint.config import apply_overrides  # noqa: E402
from inpaint.data import iter_split, pack_dataset  # noqa: E402
from inpaint.data.loader import make_train_loader  # noqa: E402
from inpaint.ema import GeneratorEMA  # noqa: E402
from inpaint.inference import Inpainter, postprocess  # noqa: E402
from inpaint.trainer import Trainer, _unwrap  # noqa: E402

DECAYS = (0.98, 0.99, 0.995)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the quickstart recipe (repeatable)")
    argv = parser.parse_args(argv).overrides
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="inpaint-ema-probe-") as tmp:
        data = pack_dataset("sample", None, f"{tmp}/sample", progress=False).output_url
        samples = [(p, k, im) for p, (k, im) in enumerate(iter_split(data, "test", 64))]
        protocol = ev.Protocol(data=data, split="test", seed=0, count=len(samples), image_size=64, local_size=40)
        config = apply_overrides(recipes.get("quickstart"), argv)
        config = config.replace(data=dataclasses.replace(config.data, url=data))
        torch.manual_seed(0)
        trainer = Trainer(config, device="cpu")
        averages = {f"ema{d}": GeneratorEMA(trainer.generator, d) for d in DECAYS}
        g_end = config.schedule.generator_steps
        d_end = g_end + config.schedule.discriminator_steps
        curves: dict[str, list[tuple[int, list[float], list[float]]]] = {}
        loader = make_train_loader(config.data, config.model, config.mask)
        start = time.perf_counter()
        while not trainer.done:
            for batch in loader:
                trains_generator = trainer.phase.trains_generator
                trainer.train_step(batch)
                if trains_generator:
                    for average in averages.values():
                        average.update(_unwrap(trainer.generator))
                if trainer.step in (1500, g_end, d_end) or (trainer.step > d_end and trainer.step % 50 == 0):
                    networks = {"raw": trainer.generator, **{k: v.module for k, v in averages.items()}}
                    for name, network in networks.items():
                        scores = ev.evaluate_samples(Inpainter(copy.deepcopy(network), config, device="cpu").complete,
                                                     samples, protocol, postprocess=postprocess)
                        raw = ev.summarize(scores.rows, protocol.kinds)
                        post = ev.summarize(scores.rows, protocol.kinds, ev.POST)
                        figures = ([raw[k]["hole_psnr"]["mean"] for k in protocol.kinds],
                                   [post[k]["hole_psnr"]["mean"] for k in protocol.kinds])
                        curves.setdefault(name, []).append((trainer.step, *figures))
                        print(f"{trainer.step:>5} {time.perf_counter() - start:5.0f}s {name:<9} raw "
                              + " ".join(f"{v:.2f}" for v in figures[0]) + " | post "
                              + " ".join(f"{v:.2f}" for v in figures[1]), flush=True)
                if trainer.done:
                    break
    print(f"hole kinds: {', '.join(protocol.kinds)}; swing from step {d_end} on")
    for name, points in curves.items():
        points = [p for p in points if p[0] >= d_end]
        swings = []
        for which in (1, 2):
            per_kind = [statistics.pstdev([b[which][k] - a[which][k] for a, b in zip(points, points[1:])])
                        for k in range(len(protocol.kinds))]
            swings.append(sum(per_kind) / len(per_kind))
        print(f"{name:<9} swing raw {swings[0]:.2f} post {swings[1]:.2f} | final raw "
              + " ".join(f"{v:.2f}" for v in points[-1][1]) + " | post " + " ".join(f"{v:.2f}" for v in points[-1][2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
