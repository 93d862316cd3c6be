"""Run the four CLIs in this process and check how they fail (issue 13's hostile-input tests).

In-process (not a subprocess per case) so that a table of dozens of cases costs one import of
torch; an uncaught exception escapes ``run_cli`` and fails the test, as a traceback would.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_MODULES: dict[str, object] = {}


def cli_main(name: str):
    """``main`` of jobs/<name>.py, or of ``python -m inpaint`` for name "fill"."""
    if name == "fill":
        from inpaint.__main__ import main

        return lambda argv: main(["fill", *argv])
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"jobs_{name}", REPO / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name].main


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def assert_one_line_error(self, match: str | None = None) -> str:
        assert self.code == 2, f"exit {self.code}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}"
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        assert len(self.error_lines) == 1, self.stderr[-3000:]
        line = self.error_lines[0]
        if match is not None:
            import re

            assert re.search(match, line), f"{match!r} not in {line!r}"
        return line


def run_cli(name: str, *argv: str) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(name)(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return Outcome(code, out.getvalue(), err.getvalue())


def tree_digest(*roots: str | os.PathLike) -> dict[str, str]:
    """Path -> sha256 of every file under the roots: 'left the run's files as they were'."""
    found = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def train_debug_run(run: Path, data_url: str | None = None, save_at: tuple[int, ...] = (2, 4),
                    batch_size: int = 4) -> Path:
    """A run folder with debug-recipe checkpoints at the given steps and the run's config.json.

    Random images, no data loader, no Ray: about a second a step. Seeded, so every call with the
    same arguments writes the same weights. ``data_url`` is recorded as the run's dataset (for
    tests that resume or evaluate it); without one the recipe's own stays.
    """
    import torch

    from inpaint import recipes
    from inpaint.masks import MaskSampler
    from inpaint.trainer import Trainer

    torch.manual_seed(0)
    config = recipes.get("debug")
    if data_url is not None:
        config = config.replace(data=type(config.data)(**{**vars(config.data), "url": data_url}))
    trainer = Trainer(config, device="cpu")
    size = config.model.image_size
    sampler = MaskSampler(config.mask, size, config.model.local_size)
    generator = torch.Generator().manual_seed(0)
    for _ in range(max(save_at)):
        masks, boxes = sampler.batch(batch_size, generator)
        images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
        trainer.train_step({"image": images, "mask": masks, "box": boxes})
        if trainer.step in save_at:
            trainer.save(run / f"checkpoint_{trainer.step:09d}")
    (run / "config.json").write_text(config.to_json())
    return run
