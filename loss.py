"""Hinton's knowledge-distillation loss, and the temperature and alpha schedules that drive it.

This file imports only torch, so it can be pasted into another project as it is.

    criterion = KLDivLossWithTemperature(temperature=5.0, alpha=0.7)
    loss = criterion(student_logits, teacher_logits, labels)

The loss
--------
With T the temperature, p_t = softmax(teacher / T) and p_s = softmax(student / T):

    loss = alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(student, labels)

    KL(p_t || p_s) = sum over classes of p_t * (log p_t - log p_s)

- Direction: KL(teacher || student), the teacher's softened distribution is the target. This is
  what `F.kl_div(log_p_s, log_p_t, log_target=True)` computes; the first argument of `F.kl_div`
  is the student's log-probabilities, not probabilities.
- Reduction: KL is summed over the classes and averaged over the distributions in the batch
  ("batchmean"). Averaging over the classes as well (`reduction="mean"`) makes the term C times too
  small, 10x on CIFAR-10. CE is the usual mean over the labelled samples, on the student's logits
  at temperature 1.
- Why T^2 (Hinton, Vinyals and Dean, 2015, "Distilling the Knowledge in a Neural Network", sec.
  2): the gradient of KL(p_t || p_s) with respect to a student logit is (p_s - p_t) / T, and for
  large T the difference p_s - p_t itself shrinks like 1/T, so the soft term's gradient shrinks
  like 1/T^2.
  Multiplying by T^2 keeps its size independent of T, so changing the temperature does not silently
  change the balance between the two terms, or the learning rate.
- alpha in [0, 1] weights the distillation term, Hinton's convention; 1 - alpha weights CE.

Shapes and dtypes
-----------------
Logits are (N, C), or (N, ..., C) for a distribution over the last dimension at every position:
the result then equals that of the flattened (N * ..., C) batch, so it does not grow with sequence
length. Labels are int64 of shape (N,) or (N, ...); -100 marks a position to leave out of CE, as
in `F.cross_entropy`. The distillation term still covers that position: the teacher gives a
target everywhere. To leave padding out of both terms, select the real positions first.
float16 and bfloat16 logits, inside or outside autocast, are computed in float32 and the result
is float32. A class that both models mask with -inf contributes nothing. The teacher's logits
are detached: no gradient ever reaches the teacher.

How other projects' weights map onto alpha
------------------------------------------
Some projects weight the CE term with their alpha, some use two independent weights:

    their loss                                 their setting       here
    a * T^2 * KL + (1 - a) * CE (Hinton)       a                   alpha = a
    a * CE + (1 - a) * T^2 * KL                a weights CE        alpha = 1 - a
    w_kd * T^2 * KL + w_ce * CE                two weights         alpha = w_kd / (w_kd + w_ce),
                                                                   lr scaled by (w_kd + w_ce)
    w_kd * KL + w_ce * CE (no T^2)             two weights         as above, w_kd / T^2 for w_kd

Scaling the loss by s = w_kd + w_ce is the same as scaling the learning rate by s for plain
SGD; with SGD's weight decay, divide the decay by s as well. Adam and AdamW hardly see the
scale of the loss, so there alpha alone carries over. The last row holds for a fixed T.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class DistillationLossParts(NamedTuple):
    """The loss and its two unweighted terms; `total` is the one to call `backward()` on."""

    total: torch.Tensor
    distillation: torch.Tensor  # T^2 * KL(p_t || p_s), batch mean
    cross_entropy: torch.Tensor  # CE(student, labels), mean over labelled samples, else 0


def check_temperature(temperature: float) -> float:
    """Return the temperature as a float, or raise ValueError if it is not finite and positive."""
    value = float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def check_alpha(alpha: float) -> float:
    """Return alpha as a float, or raise ValueError if it is outside [0, 1]."""
    value = float(alpha)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return value


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 5.0,
    alpha: float = 0.7,
) -> DistillationLossParts:
    """The distillation loss and its parts; see the module docstring for the formula.

    With `labels=None` the loss is pure distillation: the total is the distillation term alone,
    whatever alpha says, and the CE part is 0.
    """
    T = check_temperature(temperature)
    alpha = check_alpha(alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 2:
        raise ValueError(
            f"logits must have shape (N, C) or (N, ..., C), got {tuple(student_logits.shape)}"
        )
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape "
            f"{tuple(student_logits.shape)}: expected {tuple(student_logits.shape[:-1])}"
        )

    # Half-precision softmax over many classes loses the small probabilities that carry the
    # teacher's "dark knowledge", so both sides are computed in float32 (float64 stays float64).
    num_classes = student_logits.shape[-1]
    student = _at_least_float32(student_logits).reshape(-1, num_classes)
    teacher = _at_least_float32(teacher_logits.detach()).reshape(-1, num_classes)

    # (M, C) -> (M,): KL summed over classes, then averaged over the M = N * ... distributions.
    log_p_student = F.log_softmax(student / T, dim=-1)
    log_p_teacher = F.log_softmax(teacher / T, dim=-1)
    p_teacher = log_p_teacher.exp()
    # Where p_t = 0 (a masked class) the term is 0 * (-inf - log p_s): NaN unless replaced by 0.
    pointwise = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0)
    distillation = pointwise.sum(dim=-1).mean() * (T * T)

    if labels is None:
        return DistillationLossParts(distillation, distillation, distillation.new_zeros(()))

    # Sum, then divide by the labelled count (at least 1), so that a batch with every label
    # ignored gives CE = 0 instead of the 0 / 0 = NaN of reduction="mean".
    flat_labels = labels.reshape(-1)
    cross_entropy = F.cross_entropy(
        student, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    ) / (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    total = alpha * distillation + (1.0 - alpha) * cross_entropy
    return DistillationLossParts(total, distillation, cross_entropy)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


class KLDivLossWithTemperature(nn.Module):
    """`alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)`.

    Args:
        temperature: T > 0, the softening of both distributions; 1 leaves them as they are.
        alpha: weight in [0, 1] of the distillation term; the CE term gets 1 - alpha.

    Calling the module returns the scalar total. `parts()` returns the total with the two
    unweighted terms for logging, computed once. Both take `temperature=` and `alpha=` to
    override the stored values for one call; a schedule can also assign the attributes between
    epochs (`criterion.temperature = 4.0`), which are checked on assignment.
    """

    def __init__(self, temperature: float = 5.0, alpha: float = 0.7):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_temperature(value)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_alpha(value)

    def parts(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        temperature: Optional[float] = None,
        alpha: Optional[float] = None,
    ) -> DistillationLossParts:
        return distillation_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature if temperature is None else temperature,
            alpha=self.alpha if alpha is None else alpha,
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        temperature: Optional[float] = None,
        alpha: Optional[float] = None,
    ) -> torch.Tensor:
        return self.parts(
            student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha
        ).total

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


# Schedules: plain functions of the 0-based epoch and the number of epochs, so a training loop
# can set `criterion.temperature = schedule(epoch, total_epochs)` at the start of every epoch.


def _check_epoch(epoch: int, total_epochs: int) -> None:
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, {total_epochs}), got {epoch}")


def step_temperature(epoch: int, total_epochs: int, start: float = 8.0) -> float:
    """start * 0.5 ** (epoch // (total_epochs // 3)): halved every total_epochs // 3 epochs.

    30 epochs give 8, 4, 2 over the three thirds; an epoch count that is not a multiple of 3
    gets a fourth step or more (10 epochs: 8, 4, 2, 1; 5 epochs: 8, 4, 2, 1, 0.5). With fewer
    than 3 epochs the period is 1 epoch, so the value stays defined, positive and
    non-increasing.
    """
    _check_epoch(epoch, total_epochs)
    period = max(1, total_epochs // 3)
    return start * 0.5 ** (epoch // period)


def exponential_alpha(
    epoch: int, total_epochs: int, start: float = 0.9, final_ratio: float = 0.1
) -> float:
    """start * final_ratio ** (epoch / total_epochs): leans on the teacher early, labels late."""
    _check_epoch(epoch, total_epochs)
    return start * final_ratio ** (epoch / total_epochs)


def constant(epoch: int, total_epochs: int, value: float) -> float:
    """The same value every epoch."""
    _check_epoch(epoch, total_epochs)
    return value


def linear(epoch: int, total_epochs: int, start: float, end: float) -> float:
    """From start at the first epoch to end at the last, in equal steps."""
    _check_epoch(epoch, total_epochs)
    if total_epochs == 1:
        return start
    return start + (end - start) * epoch / (total_epochs - 1)


def cosine(epoch: int, total_epochs: int, start: float, end: float) -> float:
    """From start at the first epoch to end at the last along half a cosine wave."""
    _check_epoch(epoch, total_epochs)
    if total_epochs == 1:
        return start
    progress = epoch / (total_epochs - 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
