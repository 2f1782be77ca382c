"""One training step and one evaluation pass: what every run, `revnets eval` and the benchmarks share.

`train_step` refuses to apply a step whose loss or gradient is not finite (`NonFiniteError`),
so that the weights stay those of the last good step. The check costs one host sync per step.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..inference import logits
from ..networks import smoothness_penalty

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(ArithmeticError):
    """A loss, gradient or weight that is NaN or infinite; `what` names which."""

    def __init__(self, what: str, message: str | None = None):
        super().__init__(message or f"non-finite {what}")
        self.what = what


def autocast(device: torch.device, amp: str):
    """Autocast to `amp`'s dtype (AMP_DTYPES) on `device`; no autocast for "off"."""
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               smoothness: float = 0.0, amp: str = "off", scaler: torch.amp.GradScaler | None = None,
               net: nn.Module | None = None, teacher: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on cross-entropy + `smoothness` * Eq. (22)'s penalty, or with a `teacher` on
    the KL divergence from the teacher's distribution to the model's (distillation: per target, the
    teacher run without a graph); returns (cross-entropy (), logits).

    x: a batch on the model's device (images (b, C, H, W) float32, or tokens (b, T)); y: its targets,
    (b,) classes or (b, T) next tokens, int64; logits (b, K) or (b, T, K) (a model may return an
    output with `.logits`, as Hugging Face models do). `net` is the module whose weights the penalty
    reads (the model itself unless `model` wraps it, as DDP or torch.compile do).
    NonFiniteError ("loss" or "gradient") before the optimiser moves when either is NaN or infinite;
    with an fp16 `scaler`, infinite gradients are the scaler's to skip, as AMP intends.
    """
    with autocast(x.device, amp):
        out = logits(model(x)).flatten(0, -2)
        loss = F.cross_entropy(out, y.flatten())
        if teacher is not None:
            with torch.no_grad():
                target = _log_probs(logits(teacher(x)).flatten(0, -2))
            fit = F.kl_div(_log_probs(out), target, log_target=True, reduction="batchmean")
    total = fit if teacher is not None else loss
    total = total + smoothness * smoothness_penalty(net or model) if smoothness else total
    opt.zero_grad(set_to_none=True)
    scaling = scaler is not None and scaler.is_enabled()
    (scaler.scale(total) if scaling else total).backward()
    finite = torch.isfinite(total)
    if not scaling:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    if not finite.item():  # the one host sync
        raise NonFiniteError("loss" if not torch.isfinite(total) else "gradient")
    if scaling:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return loss.detach(), out.view(*y.shape, -1).detach()


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax in float32 at least (bf16 and fp16 logits are upcast)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


@torch.no_grad()
def totals(model: nn.Module, batches, amp: str = "off") -> torch.Tensor:
    """(loss sum, correct, images), float64 (3,) on the batches' device, of `model` (put in eval mode).

    `batches` yields (x (b, C, H, W) float32, y (b,) int64) on the model's device. The sums stay on
    the device (one host sync, by the caller), so that `revnets train` can add them over processes.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp mode {amp!r}; expected one of {', '.join(AMP_DTYPES)}")
    model.eval()
    loss_sum, correct, images = 0, 0, 0
    for x, y in batches:
        with autocast(x.device, amp):
            out = model(x)
        loss_sum = loss_sum + F.cross_entropy(out.float(), y, reduction="sum").double()
        correct = correct + (out.argmax(dim=1) == y).sum()
        images += len(y)
    if images == 0:
        raise ValueError("the loader yielded no images to evaluate")
    return torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(images)])


def evaluate(model: nn.Module, loader, amp: str = "off") -> dict:
    """Mean cross-entropy and accuracy of `model` (put in eval mode) over every batch of `loader`.

    `loader` yields (x (b, C, H, W) float32, y (b,) int64) on the model's device.
    Returns {"loss": float, "acc": float in [0, 1], "images": int}.
    """
    loss_sum, correct, images = totals(model, loader, amp).tolist()
    return {"loss": loss_sum / images, "acc": correct / images, "images": int(images)}
