"""The training loop: unsupervised training as in the paper (section 4.2) of UDRNet, its VoxelMorph
baseline or a comparison network.

One epoch = one pass over the training pairs in a seeded order (per process,
under ``torchrun``), Adam steps of ``batch_size`` pairs (reached by gradient
accumulation over micro-batches), then a validation pass. ``RUN_DIR`` gets

* ``config.yaml`` -- the resolved configuration;
* ``last.pt`` -- weights, optimizer, progress, RNG states (every epoch and on a stop);
* ``last.prev.pt`` -- the ``last.pt`` before that, which ``--resume`` falls back to when ``last.pt``
  cannot be loaded;
* ``best.pt`` -- the weights with the lowest validation loss so far (what ``register`` loads);
* ``log.csv`` and ``tensorboard/`` -- per-epoch losses and validation metrics.

While a run trains, ``RUN_DIR`` is locked: a second run into it is refused.

Row 0 of the log is the untrained network (near-zero output: the identity), or the
``init_weights`` a fine-tuning run starts from. With ``supervised_weight`` > 0 the
validation loss includes the supervised term on validation pairs with a known field.
Training ends after ``epochs`` or when the validation loss has not improved
for ``patience`` epochs. A stop request (Ctrl-C, SIGTERM, or a file named
``STOP`` created in ``RUN_DIR``) finishes the current optimizer step, writes
``last.pt`` and raises :class:`CancelledError`;
``resume`` continues from ``last.pt`` exactly where it stopped. A training loss
that is not finite (NaN or Inf) stops the run with :class:`TrainingError` before
the optimizer step; the checkpoints on disk are left as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from LungUDRNetLib import metrics
from LungUDRNetLib.checkpoint import check_finite_weights, read_checkpoint, save_checkpoint
from LungUDRNetLib.errors import CancelledError, InputError, ModelError, OutputError, TrainingError
from LungUDRNetLib.instance_optimisation import METADATA_KEY as OPTIMISATION_KEY, InstanceOptimisationConfig
from LungUDRNetLib.io import atomic_path
from LungUDRNetLib.losses import registration_loss, supervised_flow_error
from LungUDRNetLib.networks import METHOD_NAMES, network_from_config
from LungUDRNetLib.output_folder import output_lock
from LungUDRNetLib.outputs import check_output_dir
from LungUDRNetLib.progress_events import emit, emit_progress
from LungUDRNetLib.voxelmorph_net import VoxelMorphNet, VoxelMorphNetConfig
from LungUDRNetLib.warp import warp

from . import distributed
from .config import TrainConfig, write_config
from .datasets import load_splits
from .pair_dataset import PairDataset, check_pairs
from .runlog import RunLog

log = logging.getLogger(__name__)

AUTOCAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STOP_FILE = "STOP"
PREVIOUS_LAST = "last.prev.pt"
StepCallback = Callable[[int, int], None]


@dataclass
class Progress:
    """Where a run stands; stored in ``last.pt`` so that ``--resume`` continues exactly.

    ``step``, ``loss_sum`` and ``samples`` describe the unfinished epoch
    ``epoch + 1`` after a stop request (optimizer steps done, summed training
    loss and pair count over all processes); they are 0 between epochs.
    """

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The Python, numpy and torch RNG states as checkpoint-safe values (tensors and plain types)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states captured by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def batch_plan(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """(pairs per forward pass and process, micro-batches accumulated per optimizer step), such that
    micro-batch x accumulation x processes = ``batch_size``."""
    per_process, rest = divmod(config.batch_size, world_size)
    if rest or not per_process:
        raise InputError(f"config batch_size: {config.batch_size} is not a multiple of the {world_size} processes")
    micro = config.micro_batch_size or per_process
    if per_process % micro:
        raise InputError(f"config micro_batch_size: {micro} does not divide the {per_process} pairs per "
                         "process and step")
    return micro, per_process // micro


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """While active, the first Ctrl-C (SIGINT) or SIGTERM sets ``stop``; a second Ctrl-C aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum, frame) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        log.warning("%s: finishing the current step, then writing a checkpoint (Ctrl-C again aborts now)",
                    signal.Signals(signum).name)

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def build_network(model_config) -> torch.nn.Module:
    """A freshly initialised network for ``model_config`` (:mod:`LungUDRNetLib.networks`, or the voxelmorph
    package's)."""
    if isinstance(model_config, VoxelMorphNetConfig):
        return VoxelMorphNet(model_config)
    return network_from_config(model_config.to_dict())


class Trainer:
    """Model, optimizer, data and progress of one run on one process."""

    def __init__(self, config: TrainConfig, run_dir: Path, context: distributed.Context, resume: bool) -> None:
        self.config, self.run_dir, self.context = config, run_dir, context
        splits = load_splits(config.data, config.pairs, config.val_fraction)
        if not splits["train"] or not splits["val"]:
            raise InputError(f"data {config.data or config.pairs}: {len(splits['train'])} training and "
                             f"{len(splits['val'])} validation pairs; at least one of each is needed")
        check_pairs(splits["train"] + splits["val"])
        self.preprocess = config.preprocess_config()
        self.train_set = PairDataset(splits["train"], self.preprocess, extra_pairs=config.augment_pairs,
                                     amplitude=config.augment_amplitude, seed=config.seed,
                                     truth=config.supervised_weight > 0, spacing_jitter=config.spacing_jitter)
        self.val_set = PairDataset(splits["val"], self.preprocess, masks=True, truth=config.supervised_weight > 0)
        self.micro_batch, self.accumulation = batch_plan(config, context.world_size)
        log.info("%d training pairs (+%d synthetic per epoch), %d validation pairs; %d pairs per step = "
                 "%d per pass x %d accumulated x %d processes", len(splits["train"]),
                 len(self.train_set) - len(splits["train"]), len(splits["val"]), config.batch_size,
                 self.micro_batch, self.accumulation, context.world_size)

        seed_everything(config.seed)
        self.net = build_network(config.model_config()).to(context.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.learning_rate)
        self.scaler = torch.amp.GradScaler(context.device.type, enabled=config.amp == "fp16")
        self.progress = Progress()
        if resume:
            self._restore()
        elif config.init_weights:
            self._initialise(Path(config.init_weights))
        self.ddp = distributed.wrap(self.net, context)
        self.model = torch.compile(self.ddp) if config.compile else self.ddp

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event, on_step: StepCallback | None = None) -> Progress:
        """Train until ``epochs``, early stopping or a stop request (then raise CancelledError)."""
        self.log = RunLog(self.run_dir, enabled=self.context.is_main)
        try:
            if not self.progress.history:
                self._end_epoch(0, None, time.perf_counter())
            while self.progress.epoch < self.config.epochs and not self._early_stopped():
                started = time.perf_counter()
                epoch = self.progress.epoch + 1
                train_loss = self._train_epoch(epoch, stop, on_step)
                if train_loss is None:
                    self._save("last.pt", trainer_state=True)
                    distributed.barrier(self.context)
                    raise CancelledError(
                        f"training stopped in epoch {epoch} after step {self.progress.step}; state saved in "
                        f"{self.run_dir / 'last.pt'}; continue with: lungudrnet train --resume {self.run_dir}")
                self._end_epoch(epoch, train_loss, started)
        finally:
            self.log.close()
        if self._early_stopped():
            log.info("early stopping: the validation loss has not improved for %d epochs", self.config.patience)
        log.info("best validation loss %.5f at epoch %d: %s", self.progress.best_val_loss,
                 self.progress.best_epoch, self.run_dir / "best.pt")
        return self.progress

    def _early_stopped(self) -> bool:
        return bool(self.config.patience) and self.progress.bad_epochs >= self.config.patience

    def _train_epoch(self, epoch: int, stop: threading.Event, on_step: StepCallback | None) -> float | None:
        """One pass over the training pairs; the mean training loss, or None after a stop request."""
        self.model.train()
        self.train_set.set_epoch(epoch)
        sampler = DistributedSampler(self.train_set, num_replicas=self.context.world_size, rank=self.context.rank,
                                     shuffle=True, seed=self.config.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
        per_step = self.micro_batch * self.accumulation
        first = self.progress.step * per_step  # pairs already used before a stop
        loader = self._loader(self.train_set, order[first:])
        step = self.progress.step
        loss_sum, samples = (self.progress.loss_sum, self.progress.samples) if self.context.is_main else (0.0, 0)
        bar = tqdm(total=math.ceil(len(order) / per_step), initial=step, desc=f"epoch {epoch}/{self.config.epochs}",
                   unit="step", disable=not self.context.is_main, dynamic_ncols=True)
        stop_file = self.run_dir / STOP_FILE
        self.optimizer.zero_grad(set_to_none=True)
        finite = True
        with bar:
            for index, batch in enumerate(loader):
                count = batch["fixed"].shape[0]
                step_pairs = min(per_step, len(order) - step * per_step)
                ends_step = (index + 1) % self.accumulation == 0 or index + 1 == len(loader)
                synchronise = ends_step or not self.context.distributed
                with contextlib.nullcontext() if synchronise else self.ddp.no_sync():
                    total = self._forward(self.model, batch)[2]["total"]
                    self.scaler.scale(total * (count / step_pairs)).backward()
                value = total.item()
                finite = finite and math.isfinite(value)
                loss_sum, samples = loss_sum + value * count, samples + count
                if not ends_step:
                    continue
                if distributed.any_process(not finite, self.context):
                    raise self._diverged(epoch, step + 1)
                self._optimizer_step()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{value:.4f}")
                if self.context.is_main:
                    emit_progress((epoch - 1 + step / bar.total) / self.config.epochs,
                                  f"epoch {epoch}/{self.config.epochs}: step {step}/{bar.total}", stage="training")
                if on_step is not None:
                    on_step(epoch, step)
                if distributed.any_process(stop.is_set() or stop_file.exists(), self.context):
                    loss_sum, samples = distributed.all_sum([loss_sum, samples], self.context)
                    self.progress = dataclasses.replace(self.progress, step=step, loss_sum=loss_sum,
                                                        samples=int(samples))
                    return None
        loss_sum, samples = distributed.all_sum([loss_sum, samples], self.context)
        return loss_sum / samples

    def _diverged(self, epoch: int, step: int) -> TrainingError:
        """The error for a training loss that is not finite in optimizer step ``step`` of ``epoch``."""
        rate = self.config.learning_rate
        amp = " or train without mixed precision (--amp none)" if self.config.amp != "none" else ""
        return TrainingError(
            f"training stopped: the loss is not finite (NaN or Inf) in epoch {epoch}, step {step}; the weights "
            f"diverged. The checkpoints in {self.run_dir} (last.pt, best.pt) are unchanged. Lower the learning "
            f"rate (now {rate:g}){amp}, then continue with: lungudrnet train --resume {self.run_dir} "
            f"--learning-rate {rate / 10:g}")

    def _optimizer_step(self) -> None:
        """Apply the accumulated gradients (unscaled first under fp16) and clear them."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _end_epoch(self, epoch: int, train_loss: float | None, started: float) -> None:
        """Validate, update early stopping, write checkpoints and the log."""
        scores = self._validate()
        progress = self.progress
        improved = scores["val_loss"] < progress.best_val_loss
        progress = dataclasses.replace(
            progress, epoch=epoch, step=0, loss_sum=0.0, samples=0,
            best_val_loss=scores["val_loss"] if improved else progress.best_val_loss,
            best_epoch=epoch if improved else progress.best_epoch,
            bad_epochs=0 if improved else progress.bad_epochs + 1,
            history=[*progress.history, {"epoch": epoch, "train_loss": train_loss, **scores,
                                         "learning_rate": self.optimizer.param_groups[0]["lr"],
                                         "seconds": round(time.perf_counter() - started, 3)}])
        self.progress = progress
        if improved:
            self._save("best.pt", trainer_state=False)
        self._save("last.pt", trainer_state=True)
        self.log.write(progress.history)
        if self.context.is_main:
            dice = scores["val_dice_percent"]
            summary = (f"epoch {epoch}: train loss {'-' if train_loss is None else f'{train_loss:.5f}'}, "
                       f"val loss {scores['val_loss']:.5f}, val NCC {scores['val_ncc_percent']:.2f}%, "
                       f"1-MSE {scores['val_one_minus_mse_percent']:.2f}%"
                       + ("" if dice is None else f", Dice {dice:.2f}%") + (" (best)" if improved else ""))
            log.info("%s", summary)
            emit("summary", message=summary)

    # -- computation ----------------------------------------------------------------------------

    def _loader(self, dataset, sampler=None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.micro_batch, sampler=sampler, num_workers=self.config.num_workers,
                          pin_memory=self.context.device.type == "cuda")

    def _forward(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(flow, warped moving, loss terms) of a batch; the network under autocast, warp and loss in float32."""
        device = self.context.device
        fixed = batch["fixed"].to(device, non_blocking=True)
        moving = batch["moving"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=AUTOCAST_TYPES.get(self.config.amp), enabled=self.config.amp != "none"):
            flow = model(moving, fixed)
        flow = flow.float()
        warped = warp(moving, flow)
        terms = registration_loss(fixed, warped, flow, self.config.similarity, self.config.smoothness_weight,
                                  self.config.folding_weight)
        if "true_flow" in batch:
            terms["supervised"] = supervised_flow_error(flow, batch["true_flow"].to(device),
                                                        batch["has_truth"].to(device))
            terms["total"] = terms["total"] + self.config.supervised_weight * terms["supervised"]
        return flow, warped, terms

    @torch.no_grad()
    def _validate(self) -> dict:
        """Mean validation loss terms and the paper's metrics on the network grid, over all processes."""
        self.net.eval()
        shard = Subset(self.val_set, range(self.context.rank, len(self.val_set), self.context.world_size))
        sums = dict.fromkeys(("pairs", "total", "similarity", "smoothness", "ncc", "mse", "masks", "dice"), 0.0)
        for batch in self._loader(shard):
            flow, warped, terms = self._forward(self.net, batch)
            count = flow.shape[0]
            sums["pairs"] += count
            for key in ("total", "similarity", "smoothness"):
                sums[key] += terms[key].item() * count
            warped_masks = warp(batch["moving_mask"].to(flow.device), flow, mode="nearest").cpu().numpy()
            for i in range(count):
                fixed, moved = batch["fixed"][i, 0].numpy(), warped[i, 0].cpu().numpy()
                mse, ncc = metrics.mse_and_ncc(fixed, moved)
                sums["ncc"] += ncc
                sums["mse"] += mse
                if batch["has_masks"][i]:
                    sums["masks"] += 1
                    sums["dice"] += metrics.dice(batch["fixed_mask"][i, 0].numpy(), warped_masks[i, 0])
        sums = dict(zip(sums, distributed.all_sum(list(sums.values()), self.context)))
        self.net.train()
        pairs = sums["pairs"]
        return {"val_loss": sums["total"] / pairs, "val_similarity": sums["similarity"] / pairs,
                "val_smoothness": sums["smoothness"] / pairs, "val_ncc_percent": 100.0 * sums["ncc"] / pairs,
                "val_one_minus_mse_percent": 100.0 * (1.0 - sums["mse"] / pairs),
                "val_dice_percent": 100.0 * sums["dice"] / sums["masks"] if sums["masks"] else None}

    # -- checkpoints ----------------------------------------------------------------------------

    def _save(self, name: str, trainer_state: bool) -> None:
        """Write ``RUN_DIR/name`` on rank 0: weights and configs, plus, with ``trainer_state``, everything
        ``--resume`` needs (then the file it replaces is kept as ``last.prev.pt``)."""
        if not self.context.is_main:
            return
        progress = self.progress
        metadata = {"name": METHOD_NAMES[self.config.model], "model": self.config.model, "epoch": progress.epoch,
                    "best_epoch": progress.best_epoch, "best_val_loss": progress.best_val_loss,
                    "train_config": self.config.to_dict(), "trainer": "LungUDRNetTrainer",
                    "torch": str(torch.__version__), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    OPTIMISATION_KEY: InstanceOptimisationConfig().to_dict()}
        extra = None
        if trainer_state:
            extra = {"trainer_state": {"progress": dataclasses.asdict(progress),
                                       "optimizer": self.optimizer.state_dict(),
                                       "scaler": self.scaler.state_dict(), "rng": rng_state()}}
            if (self.run_dir / name).is_file():
                copy_atomic(self.run_dir / name, self.run_dir / PREVIOUS_LAST)
        save_checkpoint(self.run_dir / name, self.net, self.preprocess, metadata, extra)

    def _initialise(self, path: Path) -> None:
        """Start from the weights of checkpoint ``path`` (fine-tuning); raise ModelError if they do not fit."""
        state = read_checkpoint(path)
        check_finite_weights(state["state_dict"], f"init weights {path}")
        if state["model_config"] != self.net.config.to_dict():
            raise ModelError(f"init weights {path}: its architecture differs from the configuration's "
                             f"({state['model_config']} vs {self.net.config.to_dict()})")
        self.net.load_state_dict(state["state_dict"])
        log.info("starting from the weights of %s", path)

    def _restore(self) -> None:
        """Load weights, optimizer, progress and RNG states from ``last.pt`` (or ``last.prev.pt``)."""
        path, state = read_resume_checkpoint(self.run_dir, repair=self.context.is_main)
        if "trainer_state" not in state:
            raise ModelError(f"resume {path}: holds no trainer state (not a last.pt of a training run)")
        if state["model_config"] != self.net.config.to_dict():
            raise ModelError(f"resume {path}: the configuration's architecture differs from the checkpoint's")
        trainer = state["trainer_state"]
        self.net.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scaler.load_state_dict(trainer["scaler"])
        self.progress = Progress(**trainer["progress"])
        set_rng_state(trainer["rng"])
        log.info("resuming %s after epoch %d, step %d", path, self.progress.epoch, self.progress.step)


def copy_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` onto ``target``; ``target`` is never left partial."""
    with atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)


def read_resume_checkpoint(run_dir: Path, repair: bool) -> tuple[Path, dict]:
    """(path, state) of ``run_dir/last.pt``, or, when that cannot be loaded, of ``last.prev.pt`` with a
    warning (``repair`` then copies it over the broken ``last.pt``); ModelError when neither loads."""
    last, previous = run_dir / "last.pt", run_dir / PREVIOUS_LAST
    if not last.is_file() and not previous.is_file():
        raise InputError(f"resume {run_dir}: no last.pt there (not a training run folder)")
    try:
        return last, read_checkpoint(last)
    except ModelError as error:
        problem = error
    try:
        state = read_checkpoint(previous)
    except ModelError:
        raise ModelError(f"{problem}; there is no loadable {PREVIOUS_LAST} to resume from either. best.pt there "
                         "still works with `lungudrnet register --model`; to train again, start a new run with "
                         "another --out") from None
    log.warning("%s; resuming from the previous checkpoint %s instead", problem, previous)
    if repair:
        copy_atomic(previous, last)
    return previous, state


@contextlib.contextmanager
def run_folder(run_dir: Path, config: TrainConfig, resume: bool):
    """Create ``run_dir``, hold its lock for the run (:func:`~LungUDRNetLib.output_folder.output_lock`: a second
    run into it is refused) and write ``config.yaml``; refuse to start a new run over an existing one."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"output {run_dir}: cannot be created ({error.strerror})") from None
    with output_lock(run_dir):
        if not resume and (run_dir / "last.pt").exists():
            raise OutputError(f"output {run_dir}: already holds a training run; continue it with --resume "
                              f"{run_dir} or choose another --out")
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier session
        write_config(config, run_dir / "config.yaml")
        yield run_dir


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
          stop: threading.Event | None = None, on_step: StepCallback | None = None) -> Progress:
    """Train (or, with ``resume``, continue training) into ``run_dir``; see the module docstring.

    ``stop`` is a stop request (set by Ctrl-C/SIGTERM in the command line; ``RUN_DIR/STOP`` works too);
    ``on_step(epoch, step)`` is called after every optimizer step.
    """
    run_dir = Path(run_dir)
    check_output_dir(run_dir, [], True, ("config.yaml",))  # e.g. --out names a file: refused before any work
    context = distributed.setup(config.device)
    try:
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        if context.device.type == "cuda":
            torch.backends.cudnn.benchmark = not config.deterministic
        trainer = Trainer(config, run_dir, context, resume)  # checks the data and last.pt before writing
        with run_folder(run_dir, config, resume) if context.is_main else contextlib.nullcontext():
            distributed.barrier(context)
            return trainer.run(stop or threading.Event(), on_step)
    finally:
        distributed.teardown(context)
