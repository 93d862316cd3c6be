"""A single-process trainer: one optimizer step per call, in whichever phase the schedule says.

It knows nothing of Ray or of storage. A distributed caller wraps the two networks (e.g. in
DDP) through :meth:`Trainer.wrap_models`, then compiles them (both in that order:
``inpaint.distributed.prepare_for_training``), and moves the directories that :meth:`Trainer.save`
writes; everything needed to continue exactly (both models, both optimizers, step, samples
seen, RNG, config) goes through :meth:`state_dict` / :meth:`load_state_dict`. The data position
belongs to the loader, not the trainer: the caller hands its loader to :meth:`save` and
:meth:`load`, which keep its ``state_dict`` in the same checkpoint file (torchtitan's way).

Gradient hygiene, since GLCIC-PyTorch gets it wrong: the discriminator learns from the
*composited* output (known pixels copied from the input), detached from the generator; the
generator's adversarial term goes through a frozen, unwrapped discriminator, so no gradient
of one network ever lands on the other's parameters.

Each part of a step runs inside a ``torch.profiler.record_function`` range named in
:data:`SECTIONS`, so a profile of a step attributes its time (``benchmarks/profiling.py``); a
range costs microseconds when no profiler is active.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn
from torch.profiler import record_function

from inpaint import checkpoint as ckpt
from inpaint.config import Config
from inpaint.ema import GeneratorEMA
from inpaint.errors import one_line
from inpaint.hardware import default_bf16, default_channels_last, resolve_device
from inpaint.losses import (
    contextual_loss,
    discriminator_loss,
    generator_adversarial_loss,
    reconstruction_loss,
)
from inpaint.models import build_discriminator, build_generator, composite, crop_local
from inpaint.phases import Phase, PhaseSchedule, lr_factor
from inpaint.tensorboard import show_hole

log = logging.getLogger(__name__)

class Stateful(Protocol):
    """What a checkpoint can carry beside the trainer (e.g. the training loader's position)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# The profiler ranges of a step (see the module docstring); losses, compositing and crops are outside them.
SECTIONS = ("generator", "discriminator", "vgg16", "contextual_loss", "optimizer")


def _unwrap(module: nn.Module) -> nn.Module:
    """The network inside its wrappers: DDP's ``module``, torch.compile's ``_orig_mod``."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _unloadable(directory: str | Path, what: str, exc: Exception) -> ckpt.UnloadableCheckpoint:
    """``directory: what (the error in one line)``."""
    return ckpt.UnloadableCheckpoint(f"{directory}: {what} ({one_line(exc)})")


def _without_ddp(module: nn.Module) -> nn.Module:
    """The network without its DDP wrapper (still compiled where it was)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop parameter gradients of ``module`` (inputs still get theirs)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    # random.setstate wants nested tuples; a round trip through some serialisers gives lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _optimizer(parameters: Iterable[nn.Parameter], lr: float, config: Config,
               device: torch.device) -> torch.optim.Optimizer:
    """``optim.name``: Adam with the run's betas and weight decay, fused into one kernel per step on
    CPU and CUDA; or Adadelta (GLCIC's) with torch's rho and eps."""
    if config.optim.name == "adadelta":
        return torch.optim.Adadelta(parameters, lr=lr, weight_decay=config.optim.weight_decay)
    # The paper's discriminator holds ~150 M parameters, most in its FC layers: the fused step reads and
    # writes each of them once instead of once per foreach op, 4x faster on CPU (benchmarks/RESULTS.md).
    return torch.optim.Adam(parameters, lr=lr, betas=(config.optim.beta1, config.optim.beta2),
                            weight_decay=config.optim.weight_decay,
                            fused=True if device.type in ("cpu", "cuda") else None)


def contextual_chunk(cx_chunk: int, batch_size: int, device: torch.device) -> int:
    """``loss.cx_chunk`` resolved: 0 (auto) is the whole batch on CUDA, 1 elsewhere."""
    return cx_chunk or (batch_size if device.type == "cuda" else 1)


class Trainer:
    """Owns the networks, optimizers, losses and the phase schedule of one training run."""

    # The generator's contextual loss: the custom-gradient form; benchmarks swap in the reference one.
    contextual_loss = staticmethod(contextual_loss)

    def __init__(self, config: Config, *, device: torch.device | str | None = None, world_size: int = 1,
                 rank: int = 0):
        self.config = config
        self.device = torch.device(device) if device is not None else resolve_device(config.runtime.device)
        if self.device.type == "cpu":
            # Denormal floats take a slow microcode path on x86 CPUs, and the contextual loss's softmax
            # tails (down to exp(-80)) seed them into every backward convolution: flushing them to zero,
            # as GPUs do, takes 20-25% off a CPU step (benchmarks/RESULTS.md). The setting is per process.
            torch.set_flush_denormal(True)
        if self.device.type == "cuda":
            # Every shape of a run is static (the image and the local patch are fixed sizes), so cuDNN's
            # autotuner picks each convolution's fastest algorithm once, on the first step. Per process.
            torch.backends.cudnn.benchmark = True
        # None (auto): on where the device computes bf16 natively (CUDA, or a CPU with AMX / AVX512-BF16).
        self.bf16 = default_bf16(self.device) if config.runtime.bf16 is None else config.runtime.bf16
        self.channels_last = (default_channels_last(self.device) if config.runtime.channels_last is None
                              else config.runtime.channels_last)
        self.world_size = world_size
        self.rank = rank
        # loss.cx_chunk=0 (auto): the whole batch at once on CUDA, where a loop per image launches B times
        # the kernels (B x N x N fp32 at relu3_3: 117 MiB a copy at B = 12, nothing to an H200); one
        # image at a time on CPU, where larger chunks only cost memory.
        self.cx_chunk = contextual_chunk(config.loss.cx_chunk, config.data.batch_size, self.device)
        # The discriminator the generator's frozen adversarial pass calls (see adversarial_discriminator).
        self._adversarial_discriminator: nn.Module | None = None
        self.schedule = PhaseSchedule(config.schedule)

        torch.manual_seed(config.runtime.seed)  # identical initial weights on every rank
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.generator: nn.Module = build_generator(config.model).to(self.device, memory_format=memory_format)
        self.discriminator: nn.Module = build_discriminator(config.model).to(self.device,
                                                                             memory_format=memory_format)
        self.vgg = None
        if config.loss.cx_weight > 0:
            from inpaint.vgg import VGG16Features

            self.vgg = VGG16Features(layers=config.loss.cx_layers, weights=config.loss.vgg_weights).to(
                self.device, memory_format=memory_format)
        self.g_optimizer = _optimizer(self.generator.parameters(), config.optim.g_lr, config, self.device)
        self.d_optimizer = _optimizer(self.discriminator.parameters(), config.optim.d_lr, config, self.device)
        self.step = 0
        self.samples_seen = 0
        # The averaged generator (model.ema_decay), built from the plain network before any wrapping.
        self.ema = GeneratorEMA(self.generator, config.model.ema_decay) if config.model.ema_decay > 0 else None
        self._set_learning_rates()
        torch.manual_seed(config.runtime.seed + 1 + rank)  # per-rank randomness from here on

    # ----------------------------------------------------------------- wiring
    def wrap_models(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap both networks (e.g. in DDP); optimizers keep pointing at the same parameters.

        Wrap before :meth:`compile` (``inpaint.distributed.prepare_for_training`` does both in order)."""
        self.generator = wrap(self.generator)
        self.discriminator = wrap(self.discriminator)

    def compile(self, backend: str | Callable | None = None) -> None:
        """``torch.compile`` the networks and VGG16 (``runtime.compile``), with static shapes.

        Call after :meth:`wrap_models`: compiling the DDP-wrapped network lets Dynamo's DDP optimizer
        split the graph at DDP's bucket boundaries, so each bucket's allreduce starts while the rest of
        the backward runs (a compiled module inside DDP hands DDP every gradient only at the end of
        its one backward graph). The generator's frozen adversarial pass bypasses DDP: it gets the bare
        discriminator, compiled on its own (:attr:`adversarial_discriminator`).

        ``dynamic=False``: the discriminator sees a 2B batch in its own step and a B batch in the
        adversarial pass; with torch's default the second shape recompiles with a symbolic batch size
        (slower kernels, and every later shape is symbolic too). Static, each shape compiles once.
        ``backend``: torch.compile's default (inductor) when None; tests and CPU checks use ``aot_eager``.
        """
        if isinstance(self.generator, torch._dynamo.eval_frame.OptimizedModule):
            return  # compiled already (e.g. a caller compiled before prepare_for_training)
        options: dict[str, Any] = {"dynamic": False, **({} if backend is None else {"backend": backend})}
        in_ddp = isinstance(self.discriminator, nn.parallel.DistributedDataParallel)
        self.generator = torch.compile(self.generator, **options)
        self.discriminator = torch.compile(self.discriminator, **options)
        self._adversarial_discriminator = (torch.compile(_unwrap(self.discriminator), **options)
                                           if in_ddp else self.discriminator)
        if self.vgg is not None:
            self.vgg = torch.compile(self.vgg, **options)

    @property
    def adversarial_discriminator(self) -> nn.Module:
        """The discriminator of the generator's adversarial pass: no DDP (its parameters are frozen
        there, so DDP would wait for gradients that never come), compiled where the run compiles."""
        if self._adversarial_discriminator is not None:
            return self._adversarial_discriminator
        return _without_ddp(self.discriminator)

    @property
    def phase(self) -> Phase:
        return self.schedule.phase_at(self.step, self.samples_seen)

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _to_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        image = batch["image"].to(self.device, non_blocking=True)
        image = (image.float() / 255.0 if image.dtype == torch.uint8 else image.float())
        image = image.contiguous(memory_format=memory_format)
        mask = batch["mask"].to(self.device, non_blocking=True).float().contiguous(memory_format=memory_format)
        box = batch["box"].to(self.device, non_blocking=True).long()
        return image, mask, box

    def _discriminate(self, discriminator: nn.Module, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        patches = crop_local(images, boxes, self.config.model.local_size)
        return discriminator(images, patches).float()

    # ----------------------------------------------------------------- steps
    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimizer step of the current phase; returns detached scalar metrics."""
        phase = self.phase
        if phase is Phase.DONE:
            raise RuntimeError(f"the schedule is complete at step {self.step}; nothing to train")
        image, mask, box = self._to_device(batch)
        metrics: dict[str, torch.Tensor] = {}
        self.generator.train(phase.trains_generator)
        self.discriminator.train(True)

        with torch.set_grad_enabled(phase.trains_generator), self._autocast(), record_function("generator"):
            prediction = self.generator(image, mask)
        completed = composite(image, prediction.float(), mask)

        if phase.trains_discriminator:
            metrics.update(self._discriminator_step(image, completed.detach(), box))
        if phase.trains_generator:
            metrics.update(self._generator_step(image, mask, box, prediction, completed,
                                                adversarial=phase is Phase.JOINT))

        self.step += 1
        self.samples_seen += image.shape[0] * self.world_size
        self._after_step(phase)
        return {f"loss/{phase.value}/{k}" if not k.startswith("d_prob") else f"disc/{phase.value}/{k}": v
                for k, v in metrics.items()}

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, box: torch.Tensor) -> dict:
        # One forward over real and completed together: one DDP allreduce, one BN pass.
        images = torch.cat([real, fake])
        boxes = torch.cat([box, box])
        with self._autocast(), record_function("discriminator"):
            logits = self._discriminate(self.discriminator, images, boxes)
        real_logits, fake_logits = logits.chunk(2)
        loss = discriminator_loss(real_logits, fake_logits)
        self.d_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with record_function("optimizer"):
            self._finite_step("discriminator", self.d_optimizer, self.discriminator, {"d_bce": loss})
        return {"d_bce": loss.detach(), "d_prob_real": torch.sigmoid(real_logits.detach()).mean(),
                "d_prob_fake": torch.sigmoid(fake_logits.detach()).mean()}

    def _generator_step(self, image, mask, box, prediction, completed, *, adversarial: bool) -> dict:
        loss_cfg = self.config.loss
        rec = reconstruction_loss(prediction.float(), image, mask, masking=loss_cfg.rec_masking,
                                  hole_weight=loss_cfg.hole_weight)
        total = rec
        out = {"g_rec": rec.detach()}
        if self.vgg is not None:
            cx = self._contextual(completed, image)
            total = total + loss_cfg.cx_weight * cx
            out["g_cx"] = cx.detach()
        if adversarial:
            # The unwrapped, frozen discriminator: no DDP hooks fire and no gradient reaches it.
            discriminator = self.adversarial_discriminator
            with frozen(discriminator), self._autocast(), record_function("discriminator"):
                fake_logits = self._adversarial_logits(discriminator, image, completed, box)
            adv = generator_adversarial_loss(fake_logits)
            total = total + loss_cfg.adv_weight * adv
            out["g_adv"] = adv.detach()
        self.g_optimizer.zero_grad(set_to_none=True)
        total.backward()
        with record_function("optimizer"):
            self._finite_step("generator", self.g_optimizer, self.generator,
                              {name: value for name, value in out.items() if name != "g_total"})
        out["g_total"] = total.detach()
        return out

    def _adversarial_logits(self, discriminator: nn.Module, image: torch.Tensor, completed: torch.Tensor,
                            box: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits on the completed images, its BatchNorm as loss.adv_disc_bn says."""
        mode = self.config.loss.adv_disc_bn
        if mode == "mixed":  # the batch statistics the discriminator's own step normalises with
            logits = self._discriminate(discriminator, torch.cat([image, completed]), torch.cat([box, box]))
            return logits.chunk(2)[1]
        if mode == "eval":
            discriminator.eval()
            try:
                return self._discriminate(discriminator, completed, box)
            finally:
                discriminator.train(True)
        return self._discriminate(discriminator, completed, box)

    def _contextual(self, completed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        loss_cfg = self.config.loss
        with self._autocast(), record_function("vgg16"):
            completed_features = self.vgg(completed)
            with torch.no_grad():
                original_features = self.vgg(original)
        with record_function("contextual_loss"):
            per_layer = [
                self.contextual_loss(completed_features[name].float(), original_features[name].float(),
                                     band_width=loss_cfg.cx_band_width, eps=loss_cfg.cx_eps,
                                     chunk=self.cx_chunk).mean()
                for name in loss_cfg.cx_layers
            ]
        return torch.stack(per_layer).mean()

    def _after_step(self, phase: Phase) -> None:
        """Average the generator after its optimizer step; set the learning rates of the next step."""
        if self.ema is not None and phase.trains_generator:
            self.ema.update(_unwrap(self.generator))
        self._set_learning_rates()

    def _set_learning_rates(self) -> None:
        """Each optimizer's rate for the next step: its base rate x the phase's schedule (optim.warmup_steps,
        optim.decay), computed from (step, samples seen) alone, so a resumed run continues it exactly."""
        phase, done, length = self.schedule.progress(self.step, self.samples_seen)
        if phase is Phase.DONE:
            return
        factor = lr_factor(self.config.optim, done, length)
        for optimizer, base in ((self.g_optimizer, self.config.optim.g_lr), (self.d_optimizer, self.config.optim.d_lr)):
            for group in optimizer.param_groups:
                group["lr"] = base * factor

    # ----------------------------------------------------------------- non-finite steps
    def _finite_step(self, network: str, optimizer: torch.optim.Optimizer, module: nn.Module,
                     terms: dict[str, torch.Tensor]) -> None:
        """Clip and step ``optimizer``, unless a loss term or a gradient is not finite: then the step
        is skipped (parameters and optimizer state unchanged) and counted.

        Without a host sync: the check is a device tensor that fused Adam takes as ``found_inf``
        (as GradScaler hands it over), and the counts stay on the device until
        :meth:`nonfinite_status` reads them where the loop already syncs. Adadelta has no fused
        form, so there the check is read at once.
        """
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        found = torch.zeros(1, device=self.device)
        if grads:  # before clipping: an infinite norm would clip every gradient to zero, and Adam would step
            # A norm per gradient in one fused kernel (a NaN or inf anywhere makes its norm non-finite); it
            # reads the gradients only, where GradScaler's check-and-unscale would rewrite each one.
            norms = torch.stack([norm.float() for norm in torch._foreach_norm(grads)])
            found = (~torch.isfinite(norms)).any().float().reshape(1)
        bad_terms = torch.stack([~torch.isfinite(value.detach().float()).all() for value in terms.values()])
        found = torch.clamp(found + bad_terms.any().float(), max=1.0)
        self._clip(module)
        fused = bool(optimizer.defaults.get("fused"))
        if fused:
            optimizer.found_inf = found.reshape(())  # the shape of its step counters
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not found.item():
            optimizer.step()
        state = self.__dict__.setdefault("_nonfinite", {})
        if network not in state:
            zero = torch.zeros((), device=self.device)
            state[network] = {"names": tuple(terms), "run": zero, "worst": zero, "total": zero,
                              "terms": torch.zeros(len(terms), dtype=torch.bool, device=self.device)}
        counts = state[network]
        skipped = found[0]
        counts["run"] = (counts["run"] + 1) * skipped  # consecutive skips; a good step resets it
        counts["worst"] = torch.maximum(counts["worst"], counts["run"])
        counts["total"] = counts["total"] + skipped
        if counts["names"] == tuple(terms):  # the generator's terms change with the phase
            counts["terms"] = torch.where(skipped > 0, bad_terms, counts["terms"])
        else:
            counts["names"], counts["terms"] = tuple(terms), bad_terms

    def nonfinite_status(self, batch: dict[str, Any] | None = None) -> tuple[int, str | None]:
        """(steps skipped for a non-finite loss or gradient so far, a one-line reason to stop or None).

        Reads device counters (a host sync): call it where the loop syncs anyway (logging,
        checkpoints). The reason is given once some network skipped ``optim.max_nonfinite_steps``
        steps in a row: training has diverged. When every loss term was finite but the gradients
        were not, ``batch`` (the last one) is used to find the term whose gradient is not.
        """
        state = self.__dict__.get("_nonfinite", {})
        total, reason = 0, None
        limit = self.config.optim.max_nonfinite_steps
        for network, counts in state.items():
            total += int(counts["total"].item())
            worst = int(counts["worst"].item())
            if worst >= limit and reason is None:
                flags = counts["terms"].tolist()
                named = [name for name, bad in zip(counts["names"], flags) if bad]
                if not named and batch is not None and network == "generator":
                    named = self._terms_with_nonfinite_gradients(batch)
                    what = (f"the gradient of loss term {', '.join(named)} is not finite" if named
                            else "its gradients are not finite (every loss term is)")
                else:
                    what = (f"loss term {', '.join(named)} is not finite" if named
                            else "its gradients are not finite (every loss term is)")
                reason = (f"training diverged: {worst} {network} steps in a row skipped, {what} "
                          f"(optim.max_nonfinite_steps={limit}); lower the learning rate or check the loss settings")
        return total, reason

    def _terms_with_nonfinite_gradients(self, batch: dict[str, Any]) -> list[str]:
        """The generator's loss terms whose own gradient is not finite on ``batch``: a diagnosis
        made once, when training has diverged (a forward and one backward per term, no DDP)."""
        image, mask, box = self._to_device(batch)
        generator = _without_ddp(self.generator)
        parameters = [p for p in generator.parameters() if p.requires_grad]
        loss_cfg = self.config.loss
        with torch.enable_grad(), self._autocast():
            prediction = generator(image, mask)
        completed = composite(image, prediction.float(), mask)
        terms = {"g_rec": lambda: reconstruction_loss(prediction.float(), image, mask, masking=loss_cfg.rec_masking,
                                                      hole_weight=loss_cfg.hole_weight)}
        if self.vgg is not None:
            terms["g_cx"] = lambda: self._contextual(completed, image)
        if self.phase is Phase.JOINT:
            discriminator = _without_ddp(self.discriminator)

            def adversarial() -> torch.Tensor:
                with frozen(discriminator), self._autocast():
                    return generator_adversarial_loss(self._adversarial_logits(discriminator, image, completed, box))
            terms["g_adv"] = adversarial
        found = []
        for name, term in terms.items():
            with torch.enable_grad():
                grads = torch.autograd.grad(term(), parameters, retain_graph=True, allow_unused=True)
            if any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
                found.append(name)
        return found

    def _clip(self, module: nn.Module) -> None:
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.config.optim.grad_clip)

    @torch.no_grad()
    def complete(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(masked input with its hole drawn white, completed, original) in [0, 1] for image grids; does not train."""
        image, mask, _ = self._to_device(batch)
        generator = _unwrap(self.generator)
        was_training = generator.training
        generator.eval()
        with self._autocast():
            prediction = generator(image, mask)
        generator.train(was_training)
        return show_hole(image, mask), composite(image, prediction.float(), mask), image

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": _unwrap(self.generator).state_dict(),
            "discriminator": _unwrap(self.discriminator).state_dict(),
            "generator_ema": self.ema.state_dict() if self.ema is not None else None,
            "trainer": {
                "g_optimizer": self.g_optimizer.state_dict(),
                "d_optimizer": self.d_optimizer.state_dict(),
                "step": self.step,
                "samples_seen": self.samples_seen,
                "rng": rng_state(),
                "world_size": self.world_size,
            },
        }

    def load_state_dict(self, state: dict[str, Any], *, restore_rng: bool = True) -> None:
        _unwrap(self.generator).load_state_dict(state["generator"])
        _unwrap(self.discriminator).load_state_dict(state["discriminator"])
        trainer = state["trainer"]
        self.g_optimizer.load_state_dict(trainer["g_optimizer"])
        self.d_optimizer.load_state_dict(trainer["d_optimizer"])
        self.step = int(trainer["step"])
        self.samples_seen = int(trainer["samples_seen"])
        if self.ema is not None:
            averaged = state.get("generator_ema")
            if averaged is None:  # a checkpoint from before model.ema_decay: the average restarts here
                log.info("the checkpoint holds no averaged generator; it starts from the loaded weights")
                averaged = state["generator"]
            self.ema.load_state_dict(averaged)
        self._set_learning_rates()
        # RNG streams are per rank; after a resize only rank-0's is meaningful to copy.
        if restore_rng and trainer.get("world_size", 1) == self.world_size:
            set_rng_state(trainer["rng"])

    def meta(self) -> dict[str, Any]:
        return {"step": self.step, "samples_seen": self.samples_seen, "phase": self.phase.value,
                "world_size": self.world_size}

    def save(self, directory: str | Path, *, data: Stateful | None = None) -> Path:
        """Write a checkpoint directory; ``data`` (the training loader) saves its position in it too."""
        state = self.state_dict()
        trainer = {**state["trainer"], "data": data.state_dict() if data is not None else None}
        return ckpt.save_checkpoint(directory, config=self.config, generator=state["generator"],
                                    discriminator=state["discriminator"], trainer=trainer, meta=self.meta(),
                                    generator_ema=state["generator_ema"])

    def load(self, directory: str | Path, *, data: Stateful | None = None) -> dict[str, Any]:
        """Restore from a checkpoint directory written by :meth:`save`; returns its meta.

        ``data`` gets the position saved with it (when there is one). Nothing changes, the trainer
        nor ``data``, when the checkpoint does not fit: the caller may fall back to an older one.
        """
        contents = ckpt.load_checkpoint(directory)
        if contents.trainer is None or contents.discriminator is None:
            raise ckpt.CheckpointError(f"{directory}: holds weights only; cannot resume training from it")
        changes = contents.config.resume_changes(self.config)
        if changes:  # the launcher refuses these for a run's own checkpoints; another run's may differ
            log.warning("resuming from %s, whose config differs where a resume may not change it (%s); "
                        "using this run's config", directory, "; ".join(changes))
        before = copy.deepcopy(self.state_dict())
        try:
            self.load_state_dict({"generator": contents.generator, "discriminator": contents.discriminator,
                                  "generator_ema": contents.generator_ema, "trainer": contents.trainer})
        except Exception as exc:  # size mismatch, missing keys, an optimizer state of other shapes
            self.load_state_dict(before)  # as it was: the caller may fall back to an older checkpoint
            raise _unloadable(directory, "does not fit this run's networks", exc) from None
        position = contents.trainer.get("data")
        if data is not None and position is not None:
            try:
                data.load_state_dict(position)
            except Exception as exc:  # a malformed position: the same fallback as a misfit network
                self.load_state_dict(before)
                raise _unloadable(directory, "its data position does not load", exc) from None
        return contents.meta
