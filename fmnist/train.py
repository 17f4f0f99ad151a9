"""One training loop for every architecture: batches sliced from in-memory tensors, AdamW (or SGD, or Muon),
one-cycle or cosine.

`fit(model, data, cfg, runtime, callbacks)` knows nothing of MLflow: it reports each epoch's numbers to callbacks.
The pieces it is made of (`train_step`, `train_epoch`, `validate`, `BestWeights`) are what benchmarks call too.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fmnist.config import TrainConfig
from fmnist.data import Dataset
from fmnist.errors import Diverged, Pruned  # noqa: F401  (Pruned: raised by the callbacks fit calls)


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)  # one dict of metrics per epoch, from 1
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    seconds: float = 0.0  # wall time of fit(), validation included


@dataclass
class Runtime:
    """Where and in what precision the model runs, resolved once from the config and the hardware."""
    device: torch.device
    autocast: torch.dtype | None  # None: plain fp32
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast_ctx(self):
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def describe(self) -> str:
        return f"{self.device}, {'fp32' if self.autocast is None else str(self.autocast).removeprefix('torch.')}" \
               f"{', channels_last' if self.channels_last else ''}"


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slower."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_autocast(precision: str) -> torch.dtype | None:
    """bf16 when asked, or on auto where the CPU has it natively; else None (fp32). Training and serving share it."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and native_bf16()) else None


def has_convolutions(model: nn.Module) -> bool:
    """4-d weights, so also for an exported program, which has no Conv2d modules: channels_last pays for these."""
    return any(p.dim() == 4 for p in model.parameters())


def resolve_runtime(cfg: TrainConfig, model: nn.Module | None = None) -> Runtime:
    """The device and precision to run on; also sets torch's thread count (train.threads), once."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        dtype = None if cfg.precision == "fp32" else (torch.bfloat16 if cfg.precision == "bf16" else amp)
    else:
        dtype = cpu_autocast(cfg.precision)
    has_conv = model is not None and has_convolutions(model)
    return Runtime(device, dtype, channels_last=has_conv and (dtype is not None or device.type == "cuda"))


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translation by up to `shift` px (zero padding) and horizontal flip, for a whole uint8 batch."""
    n, h, w = x.shape
    # Random numbers come from the CPU generator whatever the device, so a seed means the same on every device.
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n, 1), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = (dy + torch.arange(h, device=x.device)).unsqueeze(2)  # (n, h, 1)
    cols = (dx + torch.arange(w, device=x.device)).unsqueeze(1)  # (n, 1, w)
    out = F.pad(x, (shift, shift, shift, shift))[torch.arange(n, device=x.device).view(n, 1, 1), rows, cols]
    return torch.where(flip.view(n, 1, 1), out.flip(-1), out)


def erase(x: torch.Tensor, generator: torch.Generator, p: float, scale=(0.02, 0.2), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) for a whole uint8 batch: with probability p an image gets one rectangle
    of `scale` of its area and aspect `ratio` set to 0 (the background), a different one per image."""
    n, h, w = x.shape
    u = torch.rand(5, n, generator=generator)
    area = (scale[0] + u[0] * (scale[1] - scale[0])) * h * w
    aspect = torch.exp(math.log(ratio[0]) + u[1] * (math.log(ratio[1]) - math.log(ratio[0])))
    eh = (area * aspect).sqrt().round().clamp(1, h).long()
    ew = (area / aspect).sqrt().round().clamp(1, w).long()
    top, left = (u[2] * (h - eh + 1)).long(), (u[3] * (w - ew + 1)).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1)) & (cols >= left.view(n, 1, 1))
           & (cols < (left + ew).view(n, 1, 1)) & (u[4] < p).view(n, 1, 1))
    return x.masked_fill(box.to(x.device), 0)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, SGD with Nesterov momentum, or Muon over the trainable parameters. AdamW and SGD use the fused
    kernel, one pass over them all: the MLP's training step took 11.9 ms instead of 16.9 ms with the default."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay,
                               fused=True)
    if cfg.optimizer == "muon":
        return make_muon(params, muon_matrices(model), cfg)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trained weight matrices Muon takes: all but the first (it reads the input) and the last (the
    classifier). A model with two or fewer has none, and would train with the fallback alone."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim >= 2][1:-1]


def make_muon(params: list[nn.Parameter], matrices: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's Muon (Nesterov momentum orthogonalised by Newton-Schulz; a convolution's weight taken as its
    out x in*kh*kw matrix) on the hidden layers' weights, in one optimizer with its NAdamW fallback on the rest:
    as Muon's authors advise, the first trained layer (in the CNN and MLP, the one that reads pixels), the
    classifier, biases and batch norm stay with an Adam, and timm's own shape check sends any other unsuited
    matrix (a depthwise convolution's) there too. Muon's step is rescaled to AdamW's update size
    ("match_rms_adamw"), so train.lr and train.weight_decay keep their meaning; one-cycle cycles only the
    fallback's beta1, Muon's momentum stays 0.95."""
    import timm.optim  # here, as in fmnist.models.backbones: importing timm costs every process about 1.3 s

    hidden = {id(p) for p in matrices}
    return timm.optim.Muon([{"params": [p for p in params if id(p) in hidden]},
                            {"params": [p for p in params if id(p) not in hidden], "use_fallback": True}],
                           lr=cfg.lr, weight_decay=cfg.weight_decay, nesterov=True, ns_coefficients="original",
                           adjust_lr_fn="match_rms_adamw", betas=(0.9, 0.999))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                   pct_start=cfg.warmup)
    warmup = max(1, int(cfg.warmup * total_steps))
    schedulers = torch.optim.lr_scheduler
    return schedulers.SequentialLR(opt, [schedulers.LinearLR(opt, 1 / warmup, total_iters=warmup - 1),
                                         schedulers.CosineAnnealingLR(opt, T_max=max(1, total_steps - warmup))],
                                   milestones=[warmup])


def train_step(model: nn.Module, xb: torch.Tensor, target: torch.Tensor, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, rt: Runtime, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch; returns (the loss, the logits), both still on the device. `target`: class
    indices, or class probabilities (distillation); label smoothing applies to either."""
    with rt.autocast_ctx():
        logits = model(xb)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach(), logits.detach()


def epoch_steps(n: int, batch_size: int) -> tuple[int, int]:
    """(batch, steps) of an epoch over n images in whole batches (a last batch of 1 would break batch norm)."""
    batch = min(batch_size, n)
    return batch, n // batch


def training_batch(x: torch.Tensor, idx: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The training images at `idx`, augmented as the configuration says."""
    xb = x[idx]
    if cfg.augment:
        xb = augment(xb, generator)
    if cfg.erase:
        xb = erase(xb, generator, cfg.erase)
    return xb


def distill_target(labels: torch.Tensor, teacher: torch.Tensor, share: float) -> torch.Tensor:
    """The label and the teacher's probabilities as one target distribution. At temperature 1, Hinton et al.'s
    (1 - share) * CE(label) + share * KL(teacher || student) has the gradient of the cross-entropy with this."""
    return torch.lerp(F.one_hot(labels, teacher.shape[1]).to(teacher.dtype), teacher, share)


def train_epoch(model: nn.Module, data: Dataset, cfg: TrainConfig, rt: Runtime, opt, scheduler, scaler,
                generator: torch.Generator, epoch: int, targets: torch.Tensor | None = None) -> dict[str, float]:
    """One pass over the shuffled training split in whole batches. `targets`: each training image's target as
    class probabilities (distillation), or None: its label."""
    model.train()
    x, y = data.x_train, data.y_train
    batch, steps = epoch_steps(len(y), cfg.batch_size)
    order = torch.randperm(len(y), generator=generator).to(rt.device)
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None)
    for step in bar:
        idx = order[step * batch:(step + 1) * batch]
        xb, yb = training_batch(x, idx, cfg, generator), y[idx]
        target = yb if targets is None else targets[idx]
        loss, logits = train_step(model, xb, target, opt, scaler, rt, cfg.label_smoothing)
        scheduler.step()
        loss_sum += loss * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        if step % 20 == 0:  # the one host sync per 20 steps also catches divergence early
            check_finite(loss.item(), epoch, cfg)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() / ((step + 1) * batch):.3f}")
    seen = steps * batch
    metrics = {"train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen,
               "lr": scheduler.get_last_lr()[0]}
    check_finite(metrics["train_loss"], epoch, cfg)
    return metrics


def check_finite(loss: float, epoch: int, cfg: TrainConfig) -> None:
    if not math.isfinite(loss):
        raise Diverged(f"train.lr={cfg.lr:g}: the training loss became {loss} in epoch {epoch}; the learning rate "
                       f"is likely too high (try train.lr={cfg.lr / 10:g})")


class BestWeights:
    """A copy of the weights of the epoch with the best validation accuracy, put back at the end."""

    def __init__(self):
        self.epoch, self.accuracy, self.state = 0, -math.inf, None

    def update(self, model: nn.Module, epoch: int, accuracy: float) -> None:
        if accuracy > self.accuracy:
            self.epoch, self.accuracy = epoch, accuracy
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, rt: Runtime, callbacks: list[Callback] = ()) -> History:
    """Train on data.x_train, select the epoch with the best validation accuracy and restore its weights. The model
    stays on the runtime's device and in its memory layout, where scoring it afterwards is fastest (the CNN in bf16
    scored 2.3x as many images a second in channels_last as in the standard layout, with the same predictions)."""
    generator = torch.Generator().manual_seed(cfg.seed)  # shuffling and augmentation, on the CPU
    model.to(rt.device, memory_format=rt.memory_format)
    targets = None if data.teacher is None else \
        distill_target(data.y_train, data.teacher.probabilities, cfg.distill).to(rt.device)  # once, not per step
    data = dataclasses.replace(data, x_train=data.x_train.to(rt.device), y_train=data.y_train.to(rt.device))
    opt = make_optimizer(model, cfg)
    scheduler = make_scheduler(opt, cfg, cfg.epochs * epoch_steps(len(data.y_train), cfg.batch_size)[1])
    scaler = torch.amp.GradScaler(enabled=rt.autocast is torch.float16)
    history, best, start = History(), BestWeights(), time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        metrics = train_epoch(model, data, cfg, rt, opt, scheduler, scaler, generator, epoch, targets)
        val = validate(model, data.x_val, data.y_val, rt, cfg.eval_batch_size, cfg.label_smoothing)
        metrics = {**metrics, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                   "elapsed_seconds": time.perf_counter() - start}
        history.epochs.append(metrics)
        best.update(model, epoch, metrics["val_accuracy"])
        print(f"epoch {epoch:>3}/{cfg.epochs}  " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                            if k != "elapsed_seconds")
              + f"  {time.perf_counter() - epoch_start:.1f}s", flush=True)
        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics)
        if cfg.patience and epoch - best.epoch >= cfg.patience:
            break
    best.restore(model)
    history.best_epoch, history.best_val_accuracy = best.epoch, best.accuracy
    history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, rt: Runtime, batch_size: int = 1024) -> torch.Tensor:
    """fp32 logits on the CPU for uint8 images, in batches, with the model in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with rt.autocast_ctx():
            out.append(model(x[i:i + batch_size].to(rt.device)).float().cpu())
    return torch.cat(out)


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rt: Runtime, batch_size: int = 1024,
             label_smoothing: float = 0.0) -> dict[str, float]:
    logits = predict_logits(model, x, rt, batch_size)
    return {"loss": F.cross_entropy(logits, y, label_smoothing=label_smoothing).item(),
            "accuracy": (logits.argmax(1) == y).float().mean().item()}
