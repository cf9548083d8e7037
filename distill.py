"""Distil a CIFAR-10 teacher into a small student with Hinton's temperature-scaled KL loss.

    python distill.py --epochs 30
        ResNet-18 teacher (trained first, 30 epochs), ResNet-20 student; a GPU job.
    python distill.py --data-dir /tmp/cifar10-jpeg --teacher resnet20 --student tinycnn \\
        --subset 10000 --teacher-epochs 15 --epochs 15 --baseline
        A CPU-sized run: 6 minutes on 2 cores of a Xeon with AVX512-BF16, teacher 73.1%,
        student 67.4% with the teacher and 65.7% without it (README.md, "Results").
    torchrun --nproc_per_node=8 distill.py --epochs 30
        The same on 8 GPUs, data-parallel; --batch-size stays the global batch.
    python distill.py --resume --out runs/NAME
        Continue a stopped run from its last finished epoch.

Phase 1 gets a teacher: loads --teacher-checkpoint, or trains one with cross-entropy.
Phase 2 freezes it and trains the student with KLDivLossWithTemperature (loss.py), the
temperature and alpha following their schedules. With --baseline, phase 3 trains the same student
from the same initial weights on the same batches without the teacher, so the comparison at the
end is paired. Every epoch ends with an evaluation on the test split and a checkpoint in --out.
"""
import argparse
import functools
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import data
import loss
import models

CHECKPOINT_FORMAT = 1
PHASES = ("teacher", "student", "baseline", "done")
TOP_K = 5  # the teacher-student overlap is measured on the 5 highest-scoring classes


class UsageError(Exception):
    """A bad command-line value; reported as one line with exit status 2."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used; reported as one line with exit status 1."""


class TrainingDiverged(Exception):
    """A non-finite loss; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Command line


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: ...)" to a flag's help unless there is none or the help gives it."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False
        if "default" not in text and not hidden and action.default is not argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text


def _number(text: str, kind, requirement: str, accept) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda value: value > 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a finite number > 0",
                   lambda value: math.isfinite(value) and value > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0",
                   lambda value: math.isfinite(value) and value >= 0)


def unit_interval(text: str) -> float:
    return _number(text, float, "a number in [0, 1]", lambda value: 0.0 <= value <= 1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="distill.py",
        description="Distil a CIFAR-10 teacher into a small student (Hinton et al. 2015).",
        formatter_class=DefaultsHelpFormatter,
        allow_abbrev=False,  # so that explicit_flags can tell which flags were written
    )
    model_names = sorted(models.MODELS)

    group = parser.add_argument_group("models")
    group.add_argument("--teacher", default="resnet18", choices=model_names,
                       help="teacher architecture")
    group.add_argument("--student", default="resnet20", choices=model_names,
                       help="student architecture")
    group.add_argument("--teacher-checkpoint", metavar="PATH",
                       help="load this teacher instead of training one; its architecture and "
                            "class count must match --teacher and the data")

    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=30,
                       help="student epochs (also the baseline's)")
    group.add_argument("--teacher-epochs", type=positive_int,
                       help="teacher epochs when one is trained (default: --epochs)")
    group.add_argument("--batch-size", type=positive_int, default=256,
                       help="images per optimizer step, over all processes together")
    group.add_argument("--lr", type=positive_float, default=0.2,
                       help="peak learning rate of the one-cycle schedule (SGD, Nesterov "
                            "momentum 0.9)")
    group.add_argument("--weight-decay", type=non_negative_float, default=5e-4,
                       help="L2 weight decay")
    group.add_argument("--baseline", action="store_true",
                       help="also train the student without a teacher, from the same initial "
                            "weights on the same batches, for a paired comparison")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the student's weights, shuffling and augmentation; the "
                            "teacher's are seeded with seed + 1")

    group = parser.add_argument_group("distillation (see loss.py)")
    group.add_argument("--temperature-schedule", choices=("step", "constant", "linear", "cosine"),
                       help="step: T0 * 0.5 ** (epoch // (epochs // 3)), so 30 epochs give 8, "
                            "4, 2 and 5 epochs 8, 4, 2, 1, 0.5; constant: T0; linear/cosine: "
                            "T0 to --temperature-end; T0 is --temperature (default: constant "
                            "if --temperature is given, else step)")
    group.add_argument("--temperature", type=positive_float,
                       help="softmax temperature T0 > 0: the constant value, or where the "
                            "schedule starts (default: 5 for constant, 8 for the others)")
    group.add_argument("--temperature-end", type=positive_float,
                       help="last-epoch temperature of the linear and cosine schedules "
                            "(default: 1)")
    group.add_argument("--alpha-schedule", choices=("exponential", "constant", "linear", "cosine"),
                       help="exponential: A0 * 0.1 ** (epoch / epochs); constant: A0; "
                            "linear/cosine: A0 to --alpha-end; A0 is --alpha (default: "
                            "constant if --alpha is given, else exponential)")
    group.add_argument("--alpha", type=unit_interval,
                       help="weight A0 in [0, 1] of the distillation term, CE getting 1 - "
                            "alpha: the constant value, or where the schedule starts (default: "
                            "0.7 for constant, 0.9 for the others)")
    group.add_argument("--alpha-end", type=unit_interval,
                       help="last-epoch alpha of the linear and cosine schedules (default: 0.1)")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", default="./data",
                       help="folder holding cifar-10-batches-py, or train/ and test/ class "
                            "folders; CIFAR-10 is downloaded there if it holds neither")
    group.add_argument("--subset", type=positive_int,
                       help="train on this many training images, the same class-balanced "
                            "subset every run (default: all)")
    group.add_argument("--eval-batch-size", type=positive_int, default=1024,
                       help="images per evaluation batch")

    group = parser.add_argument_group("hardware")
    group.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                       help="auto: CUDA, else MPS, else CPU")
    group.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                       help="mixed precision; auto: bf16 on CUDA devices and CPUs with native "
                            "bf16, fp16 with loss scaling on older CUDA devices, else off")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the models: a slower start, and on the 2-core CPU "
                            "measured (README) no faster steps; for trying on a GPU")
    group.add_argument("--sync-bn", action="store_true",
                       help="with torchrun on GPUs: batch-norm statistics over all processes")

    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="DIR",
                       help="run folder for config, metrics and checkpoints (default: "
                            "runs/TEACHER-STUDENT-TIME)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last finished epoch, with its "
                            "saved configuration")
    group.add_argument("--tensorboard", action="store_true",
                       help="also write TensorBoard events to --out/tensorboard")
    return parser


# Flags that may differ when a run is resumed, since they describe the machine, not the run.
MACHINE_FLAGS = ("data_dir", "device", "out", "resume", "tensorboard", "compile",
                 "eval_batch_size")
# name: (default schedule, default start of a schedule, default constant, default end)
SCHEDULE_DEFAULTS = {"temperature": ("step", 8.0, 5.0, 1.0),
                     "alpha": ("exponential", 0.9, 0.7, 0.1)}
_NOT_GIVEN = object()


def explicit_flags(argv: Optional[List[str]]) -> dict:
    """The flags written on the command line, with their parsed values."""
    parser = build_parser()
    destinations = vars(parser.parse_args([]))
    # A default that is not a string is never parsed, so it marks what the line left out.
    parser.set_defaults(**{key: _NOT_GIVEN for key in destinations})
    parsed = vars(parser.parse_args(argv))
    return {key: value for key, value in parsed.items() if value is not _NOT_GIVEN}


def resolve_schedule(parser, args, name: str) -> None:
    """Fill in the schedule, start and end of `name` ("temperature" or "alpha")."""
    default_schedule, default_start, default_constant, default_end = SCHEDULE_DEFAULTS[name]
    value, end = getattr(args, name), getattr(args, f"{name}_end")
    schedule = getattr(args, f"{name}_schedule")
    if schedule is None:
        schedule = default_schedule if value is None else "constant"
    if end is not None and schedule not in ("linear", "cosine"):
        parser.error(f"--{name}-end is for the linear and cosine schedules, not {schedule}")
    if value is None:
        value = default_constant if schedule == "constant" else default_start
    if end is None and schedule in ("linear", "cosine"):
        end = default_end
    setattr(args, f"{name}_schedule", schedule)
    setattr(args, name, value)
    setattr(args, f"{name}_end", end)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        if args.out is None:
            parser.error("--resume needs --out, the folder of the run to continue")
        return args
    resolve_schedule(parser, args, "temperature")
    resolve_schedule(parser, args, "alpha")
    if args.teacher_epochs is None:
        args.teacher_epochs = args.epochs
    if args.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = str(Path("runs") / f"{args.teacher}-{args.student}-{stamp}")
    return args


def make_schedule(kind: str, value: float, end: Optional[float]) -> Callable:
    """A function of (epoch, total_epochs) from loss.py, starting at (or constant at) `value`."""
    if kind == "constant":
        return functools.partial(loss.constant, value=value)
    if kind in ("linear", "cosine"):
        return functools.partial(getattr(loss, kind), start=value, end=end)
    named = {"step": loss.step_temperature, "exponential": loss.exponential_alpha}[kind]
    return functools.partial(named, start=value)


def make_schedules(args) -> Dict[str, Callable[[int, int], float]]:
    return {
        "temperature": make_schedule(args.temperature_schedule, args.temperature,
                                     args.temperature_end),
        "alpha": make_schedule(args.alpha_schedule, args.alpha, args.alpha_end),
    }


# ---------------------------------------------------------------------------------------------
# Device, precision and processes: chosen here, announced in one line


class Runtime:
    """Where and how the job runs: device, precision, and this process's place among torchrun's."""

    def __init__(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = choose_device(args.device, local_rank)
        if self.world_size > 1:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            if self.device.type == "cpu":
                # torch uses every core in every process by default; share them out instead.
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        self.amp_dtype = choose_amp_dtype(args.amp, self.device)
        self.compile = args.compile

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.amp_dtype]

    def autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    def make_scaler(self) -> torch.amp.GradScaler:
        # Loss scaling is needed for fp16 only: bf16 has float32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` summed (or reduced by "min", "max") over all processes, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()))
        return tensor

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's batch-norm statistics on every process. DDP sends them at the start of each
        forward, but the last step of an epoch leaves each process with its own shard's."""
        if self.world_size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def share_from_main(self, value):
        """Rank 0's `value` on every process (a string or other small Python value)."""
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def describe(self) -> str:
        device = str(self.device)
        if self.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        elif self.device.type == "cpu":
            threads = torch.get_num_threads()
            device += f" ({threads} thread{'s' if threads > 1 else ''})"
        text = f"device {device}, precision {self.precision}, channels_last"
        if self.compile:
            text += ", torch.compile"
        if self.world_size > 1:
            text += f", {self.world_size} processes"
        return text

    def close(self):
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16, where bf16 autocast measured 2-3x faster than fp32 here."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        # Native bf16 from Ampere (compute capability 8) on; is_bf16_supported() also says yes
        # for older GPUs that only emulate it, slowly.
        native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native_bf16 else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


# ---------------------------------------------------------------------------------------------
# Checkpoints: tensors, state dicts and plain values only, written atomically


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a crash mid-write
    leaves the previous checkpoint as it was."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_text_atomic(text: str, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors all mean "not ours"
        # torch.load's messages run to paragraphs of advice; their last line holds the cause.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = lines[-1][:160] if lines and len(lines[-1]) > 8 else type(error).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({cause})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint")
    return payload


def plain_state_dict(state_dict: dict) -> dict:
    """Drop the prefixes that torch.compile (`_orig_mod.`) and DDP (`module.`) add to keys."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def model_checkpoint(name: str, model: nn.Module, image_data, args, accuracy: float) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": "model",
        "architecture": name,
        "num_classes": image_data.num_classes,
        "classes": list(image_data.classes),
        "normalization": {"mean": list(image_data.normalize.mean),
                          "std": list(image_data.normalize.std)},
        "test_accuracy": accuracy,
        "state_dict": plain_state_dict(model.state_dict()),
        "config": vars(args),
    }


def load_teacher(path: Path, architecture: str, num_classes: int) -> nn.Module:
    """A teacher from a checkpoint of this project, or from a bare state dict of the requested
    architecture; mismatches end in CheckpointError."""
    return build_teacher(read_teacher_checkpoint(path, architecture), path, architecture,
                         num_classes)


def read_teacher_checkpoint(path: Path, architecture: str) -> dict:
    """The checkpoint's contents, its architecture checked (the class count needs the data)."""
    payload = load_checkpoint(path)
    if "state_dict" in payload:
        found = payload.get("architecture")
        if found is not None and found != architecture:
            raise CheckpointError(
                f"{path} holds a {found} teacher, but --teacher is {architecture}; "
                f"pass --teacher {found}"
            )
        return payload
    if payload and all(torch.is_tensor(value) for value in payload.values()):
        return {"state_dict": payload}
    raise CheckpointError(f"{path} holds no model weights (keys: {list(payload)[:6]})")


def build_teacher(payload: dict, path: Path, architecture: str, num_classes: int) -> nn.Module:
    found_classes = payload.get("num_classes")
    if found_classes is not None and found_classes != num_classes:
        raise CheckpointError(
            f"{path} holds a teacher for {found_classes} classes, but the data set has "
            f"{num_classes}"
        )
    state_dict = payload["state_dict"]
    teacher = models.build_model(architecture, num_classes)
    try:
        teacher.load_state_dict(plain_state_dict(state_dict))
    except RuntimeError as error:
        first_problem = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
        raise CheckpointError(
            f"{path} does not fit a {architecture} with {num_classes} classes: "
            f"{first_problem.strip()[:300]}"
        ) from None
    return teacher


# ---------------------------------------------------------------------------------------------
# One epoch of training, one evaluation


def train_epoch(
    model: nn.Module,
    teacher: Optional[nn.Module],
    criterion: loss.KLDivLossWithTemperature,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    batches,
    steps: int,
    runtime: Runtime,
    progress: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> dict:
    """Train for one epoch; with `teacher=None` the loss is plain cross-entropy.

    Losses and counts stay on the device and are read once at the end, so in float32 and bf16
    the host never waits for the device inside the loop (fp16 reads the loss scale every step
    to count skipped steps); a non-finite loss is remembered by its step and reported then.
    """
    model.train()
    device = runtime.device
    # Sums over this process's images: [loss, kd part, ce part, correct predictions].
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    first_bad_step = torch.full((1,), steps, dtype=torch.int64, device=device)
    image_count = 0
    skipped_steps = 0
    # fp16 only: a skipped step lowers the scale, so one read of it per step counts them.
    scale = scaler.get_scale() if scaler.is_enabled() else None

    for step, (images, labels) in enumerate(batches):
        with runtime.autocast():
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(images)
            logits = model(images)
        if teacher is not None:
            parts = criterion.parts(logits, teacher_logits, labels)
        else:
            cross_entropy = F.cross_entropy(logits.float(), labels)
            parts = loss.DistillationLossParts(cross_entropy, torch.zeros_like(cross_entropy),
                                               cross_entropy)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts.total).backward()
        if scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
            scale, previous_scale = scaler.get_scale(), scale
            skipped_steps += int(scale < previous_scale)
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used, for the log
        scheduler.step()

        with torch.no_grad():
            batch = len(labels)
            losses = torch.stack([parts.total, parts.distillation, parts.cross_entropy])
            totals[:3] += losses * batch
            totals[3] += (logits.argmax(dim=1) == labels).sum()
            bad = ~torch.isfinite(parts.total) & (first_bad_step == steps)
            first_bad_step = torch.where(bad, step, first_bad_step)
        image_count += batch
        if progress is not None:
            progress(step, image_count, totals)

    loss_sum, kd_sum, ce_sum, correct = runtime.reduce(totals).tolist()
    images = image_count * runtime.world_size  # every process takes an equal share
    bad_step = runtime.reduce(first_bad_step, "min").item()
    # In fp16 the scaler skips the steps whose gradients overflow, and they are counted instead;
    # only an epoch of nothing but skipped steps means the run has diverged.
    if scaler.is_enabled() and skipped_steps == steps:
        raise TrainingDiverged(f"every one of its {steps} fp16 steps overflowed")
    if bad_step < steps and not scaler.is_enabled():
        raise TrainingDiverged(f"step {bad_step + 1} of {steps}")
    return {
        "loss": loss_sum / images,
        "kd_loss": kd_sum / images if teacher is not None else None,
        "ce_loss": ce_sum / images,
        "train_accuracy": correct / images,
        "skipped_steps": skipped_steps,
        "images": images,
        "lr": lr,
    }


def top_k_classes(logits: torch.Tensor) -> torch.Tensor:
    return logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices


@torch.inference_mode()
def predict_test_split(model: nn.Module, image_data, runtime: Runtime, batch_size: int):
    """(labels, top-k classes) over this process's share of the test split."""
    was_training = model.training
    model.eval()
    labels, top_classes = [], []
    batches = data.test_batches(image_data.test, batch_size, image_data.normalize,
                                runtime.rank, runtime.world_size)
    for images, batch_labels in batches:
        with runtime.autocast():
            logits = model(images)
        labels.append(batch_labels)
        top_classes.append(top_k_classes(logits.float()))
    model.train(was_training)
    return torch.cat(labels), torch.cat(top_classes)


def evaluate(model, image_data, runtime, batch_size, teacher_top_classes=None) -> dict:
    """Top-1 accuracy counted over samples; with the teacher's top-k classes on the same images,
    also the top-1 agreement and the mean share of top-k classes they have in common."""
    labels, top_classes = predict_test_split(model, image_data, runtime, batch_size)
    counts = [len(labels), (top_classes[:, 0] == labels).sum()]
    if teacher_top_classes is not None:
        counts.append((top_classes[:, 0] == teacher_top_classes[:, 0]).sum())
        shared = (top_classes.unsqueeze(2) == teacher_top_classes.unsqueeze(1)).any(2)
        counts.append(shared.double().mean(dim=1).sum())
    counts = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=labels.device)
                          for c in counts])
    counts = runtime.reduce(counts).tolist()
    with_teacher = teacher_top_classes is not None
    return {
        "test_accuracy": counts[1] / counts[0],
        "agreement": counts[2] / counts[0] if with_teacher else None,
        "top5_overlap": counts[3] / counts[0] if with_teacher else None,
        "test_images": int(counts[0]),
    }


# ---------------------------------------------------------------------------------------------
# A training phase: teacher (cross-entropy), student (distillation), baseline (cross-entropy)


class Run:
    """The state of one run: its folder, configuration, data, and what has been finished."""

    def __init__(self, args, runtime: Runtime, image_data, state: dict):
        self.args = args
        self.runtime = runtime
        self.data = image_data
        self.out = Path(args.out)
        self.state = state  # plain values and tensors, saved whole as resume.pt
        self.schedules = make_schedules(args)
        self.steps_per_epoch = len(image_data.train) // args.batch_size
        self.writer = None
        self.started = time.perf_counter()
        self.elapsed_before = state.get("elapsed_seconds", 0.0)

    def log(self, text: str = "") -> None:
        if self.runtime.is_main:
            print(text, flush=True)

    def record(self, entry: dict) -> None:
        self.state["metrics"].append(entry)

    def save_state(self, last_entry: Optional[dict] = None) -> None:
        """resume.pt first, then the metrics line: if the process dies in between, --resume
        rewrites metrics.jsonl from resume.pt."""
        if not self.runtime.is_main:
            return
        save_atomic(self.state, self.out / "resume.pt")
        if last_entry is not None:
            with open(self.out / "metrics.jsonl", "a") as metrics:
                metrics.write(json.dumps(last_entry) + "\n")
            if self.writer is not None:
                for key, value in last_entry.items():
                    if isinstance(value, (int, float)) and key != "epoch":
                        self.writer.add_scalar(f"{last_entry['phase']}/{key}", value,
                                               last_entry["epoch"])
                self.writer.flush()

    def seed(self, phase: str) -> int:
        """The student and the baseline share a seed, so they start from the same weights and
        see the same batches; the teacher has its own, so that a teacher of the student's
        architecture is not the baseline itself."""
        return self.args.seed + 1 if phase == "teacher" else self.args.seed

    def build(self, architecture: str, phase: str) -> nn.Module:
        torch.manual_seed(self.seed(phase))
        model = models.build_model(architecture, self.data.num_classes)
        return model.to(self.runtime.device, memory_format=torch.channels_last)

    def wrap_for_training(self, model: nn.Module) -> nn.Module:
        if self.runtime.world_size > 1:
            if self.args.sync_bn:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device = self.runtime.device
            device_ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.runtime.compile:
            model = torch.compile(model)
        return model

    def train_phase(self, phase: str, model: nn.Module, teacher: Optional[nn.Module] = None,
                    teacher_top_classes: Optional[torch.Tensor] = None) -> dict:
        """Train `model` for the phase's epochs, resuming where resume.pt left off."""
        args, runtime = self.args, self.runtime
        epochs = args.teacher_epochs if phase == "teacher" else args.epochs
        optimizer = make_optimizer(model, args.lr, args.weight_decay, runtime.device)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=epochs * self.steps_per_epoch,
            pct_start=0.15, anneal_strategy="linear", cycle_momentum=False,
        )
        scaler = runtime.make_scaler()
        generator = data.make_generator(self.seed(phase), runtime.device)
        criterion = loss.KLDivLossWithTemperature()
        training_state = TrainingState(model, optimizer, scheduler, scaler, generator, runtime)

        start_epoch = 0
        if self.state["phase"] == phase and self.state["phase_state"] is not None:
            start_epoch = training_state.restore(self.state["phase_state"])
        self.state["phase"] = phase
        trained = self.wrap_for_training(model)

        entry = None
        for epoch in range(start_epoch, epochs):
            if teacher is not None:
                criterion.temperature = self.schedules["temperature"](epoch, epochs)
                criterion.alpha = self.schedules["alpha"](epoch, epochs)
            batches = data.train_batches(
                self.data.train, args.batch_size, generator, self.data.normalize,
                runtime.rank, runtime.world_size,
            )
            label = f"{phase:<8} epoch {epoch + 1:>3}/{epochs}"
            started = time.perf_counter()
            try:
                result = train_epoch(trained, teacher, criterion, optimizer, scheduler, scaler,
                                     batches, self.steps_per_epoch, runtime,
                                     self.progress_printer(label, started))
            except TrainingDiverged as diverged:
                raise TrainingDiverged(
                    f"the {phase} loss became non-finite in epoch {epoch + 1}, {diverged}; "
                    f"start a new run with a lower --lr (--resume would repeat this epoch "
                    f"exactly)"
                ) from None
            seconds = time.perf_counter() - started
            runtime.broadcast_buffers(model)
            evaluation = evaluate(model, self.data, runtime, args.eval_batch_size,
                                  teacher_top_classes)

            entry = {
                "phase": phase, "epoch": epoch + 1, "epochs": epochs,
                "loss": result["loss"], "kd_loss": result["kd_loss"],
                "ce_loss": result["ce_loss"], "train_accuracy": result["train_accuracy"],
                **evaluation,
                "lr": result["lr"],
                "temperature": criterion.temperature if teacher is not None else None,
                "alpha": criterion.alpha if teacher is not None else None,
                "images_per_second": result["images"] / seconds, "seconds": seconds,
            }
            if scaler.is_enabled():
                entry["skipped_steps"] = result["skipped_steps"]
            # Over the progress line, if there was one; \x1b[K clears what it left beyond.
            self.log(("\r\x1b[K" if sys.stdout.isatty() else "") + format_entry(entry))
            self.record(entry)
            self.state["phase_state"] = training_state.capture(epoch + 1)
            self.state["elapsed_seconds"] = self.elapsed()
            self.save_state(entry)
        return entry if entry is not None else self.last_entry(phase)

    def last_entry(self, phase: str) -> dict:
        return [entry for entry in self.state["metrics"] if entry["phase"] == phase][-1]

    def progress_printer(self, label: str, started: float):
        if not (self.runtime.is_main and sys.stdout.isatty()):
            return None
        last_print = [started]
        steps = self.steps_per_epoch

        def show(step: int, images: int, totals: torch.Tensor) -> None:
            now = time.perf_counter()
            if now - last_print[0] < 1.0 and step + 1 < steps:
                return
            last_print[0] = now
            loss_sum = totals[0].item()  # one wait for the device, once a second at most
            print(f"\r{label}  step {step + 1}/{steps}  loss {loss_sum / images:.4f}  "
                  f"{images / (now - started):.0f} img/s", end="", flush=True)
        return show

    def elapsed(self) -> float:
        """Seconds of this run so far, those before a resume included."""
        return self.elapsed_before + time.perf_counter() - self.started


class TrainingState:
    """Everything a phase needs to continue exactly where it stopped, as a weights_only dict."""

    def __init__(self, model, optimizer, scheduler, scaler, generator, runtime: Runtime):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler, self.generator, self.device = scaler, generator, runtime.device

    def capture(self, epochs_done: int) -> dict:
        on_cuda = self.device.type == "cuda"
        return {
            "epoch": epochs_done,
            "model": plain_state_dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if on_cuda else None,
        }

    def restore(self, saved: dict) -> int:
        """Load `saved` and return the number of epochs it had finished."""
        self.model.load_state_dict(saved["model"])
        # The scheduler was built first and set the learning rate; the saved optimizer and
        # scheduler states then put back the rate of the step where the run stopped.
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["cpu_rng"])
        if saved["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        return saved["epoch"]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    # fused: one kernel for the whole update instead of one per parameter tensor.
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                           weight_decay=weight_decay, **fused)


def format_entry(entry: dict) -> str:
    def number(key, form):
        return format(entry[key], form) if entry.get(key) is not None else "--"

    def percent(key):
        return f"{100 * entry[key]:5.1f}%" if entry.get(key) is not None else "   -- "

    text = (
        f"{entry['phase']:<8} epoch {entry['epoch']:>3}/{entry['epochs']}  "
        f"loss {entry['loss']:.4f} (kd {number('kd_loss', '.4f')}, ce {entry['ce_loss']:.4f})  "
        f"lr {entry['lr']:.2e}  T {number('temperature', '.2f')}  "
        f"alpha {number('alpha', '.3f')}  train {percent('train_accuracy')}  "
        f"test {percent('test_accuracy')}  agree {percent('agreement')}  "
        f"{entry['images_per_second']:6.0f} img/s  {entry['seconds']:6.1f} s"
    )
    if entry.get("skipped_steps"):
        text += f"  skipped {entry['skipped_steps']} fp16 steps"
    return text


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def peak_host_memory_gib() -> Optional[float]:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def summary_table(args, results: dict, seconds: float) -> str:
    rows = [("teacher", args.teacher, results["teacher"]),
            ("student with KD", args.student, results["student"])]
    if "baseline" in results:
        rows.append(("student alone", args.student, results["baseline"]))
    lines = [f"{'':<16} {'model':<12} {'test top-1':>10} {'agreement':>10} {'top-5 overlap':>14}"]
    for name, architecture, result in rows:
        agreement = result.get("agreement")
        overlap = result.get("top5_overlap")
        lines.append(
            f"{name:<16} {architecture:<12} {100 * result['test_accuracy']:9.2f}% "
            f"{'' if agreement is None else f'{100 * agreement:9.2f}%':>10} "
            f"{'' if overlap is None else f'{100 * overlap:13.2f}%':>14}"
        )
    student = results["student"]["test_accuracy"]
    lines.append(f"{'KD vs teacher':<16} {'':<12} "
                 f"{100 * (student - results['teacher']['test_accuracy']):+9.2f} points")
    if "baseline" in results:
        lines.append(f"{'KD vs alone':<16} {'':<12} "
                     f"{100 * (student - results['baseline']['test_accuracy']):+9.2f} points")
    lines.append(f"total time {format_duration(seconds)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The job


def read_resume_state(out: Path) -> dict:
    state = load_checkpoint(out / "resume.pt")
    if state.get("kind") != "resume":
        raise CheckpointError(f"{out / 'resume.pt'} is not a resume state of distill.py")
    return state


def check_new_output(out: Path) -> None:
    """Refuse, before any work, an --out that holds anything or cannot be created."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if (out / "resume.pt").exists():
            raise UsageError(f"{out} already holds a run; continue it with --resume --out "
                             f"{out}, or choose another --out")
        raise UsageError(f"--out {out} exists and is not an empty folder; choose another")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"cannot write to --out {out}: {existing} is not a writable folder")


def describe_data(image_data) -> dict:
    return {"classes": list(image_data.classes), "train_images": len(image_data.train),
            "test_images": len(image_data.test)}


def describe_hardware(runtime: Runtime) -> dict:
    """What a resumed run must find again: the random streams and the loss scaler's state
    belong to one kind of device and one precision."""
    return {"device_type": runtime.device.type, "precision": runtime.precision}


def start_output(args, runtime: Runtime, image_data) -> dict:
    """Create --out with the configuration and a first resume state, and return that state.
    From here on a stopped run can be continued with --resume."""
    state = {
        "format": CHECKPOINT_FORMAT, "kind": "resume", "config": vars(args),
        "data": describe_data(image_data), "hardware": describe_hardware(runtime),
        "phase": "teacher", "phase_state": None, "results": {}, "metrics": [],
        "elapsed_seconds": 0.0,
    }
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(vars(args), indent=2) + "\n", out / "config.json")
        (out / "metrics.jsonl").write_text("")
        save_atomic(state, out / "resume.pt")
    except OSError as error:
        raise UsageError(f"cannot write to --out {out}: {error.strerror or error}") from None
    return state


def restore_config(given: dict, state: dict) -> argparse.Namespace:
    """The saved configuration, with the machine-specific flags given on this command line."""
    saved = argparse.Namespace(**state["config"])
    ignored = [f"--{key.replace('_', '-')}" for key in given if key not in MACHINE_FLAGS]
    for key in MACHINE_FLAGS:
        if key in given:
            setattr(saved, key, given[key])
    if ignored and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: --resume continues with the saved configuration; ignoring "
              f"{', '.join(ignored)}", flush=True)
    return saved


def tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard"
                         ) from None
    return SummaryWriter


def obtain_teacher(run: Run, loaded: Optional[nn.Module]) -> nn.Module:
    """The teacher: from this run's teacher.pt when an earlier session finished it, else the one
    `loaded` from --teacher-checkpoint, else trained here."""
    args, runtime = run.args, run.runtime
    teacher_file = run.out / "teacher.pt"
    if run.state["phase"] != "teacher":
        teacher = load_teacher(teacher_file, args.teacher, run.data.num_classes)
        return teacher.to(runtime.device, memory_format=torch.channels_last)
    if loaded is not None:
        teacher = loaded.to(runtime.device, memory_format=torch.channels_last)
        accuracy = evaluate(teacher, run.data, runtime, args.eval_batch_size)["test_accuracy"]
        run.state["results"]["teacher"] = {"test_accuracy": accuracy,
                                           "source": args.teacher_checkpoint}
    else:
        teacher = run.build(args.teacher, "teacher")
        last = run.train_phase("teacher", teacher)
        accuracy = last["test_accuracy"]
        run.state["results"]["teacher"] = {"test_accuracy": accuracy}
    if runtime.is_main:
        save_atomic(model_checkpoint(args.teacher, teacher, run.data, args, accuracy),
                    teacher_file)
    run.state.update(phase="student", phase_state=None)
    run.save_state()
    return teacher


def load_data(args, runtime: Runtime):
    # Rank 0 alone downloads, if a download is needed; the others then read its files. Its
    # failure goes to every process, or they would wait for it until the timeout.
    image_data, failure = None, None
    if runtime.is_main:
        try:
            image_data = data.load_image_data(args.data_dir, runtime.device)
        except data.DataError as error:
            failure = str(error)
    failure = runtime.share_from_main(failure)
    if failure is not None:
        raise data.DataError(failure)
    if not runtime.is_main:
        image_data = data.load_image_data(args.data_dir, runtime.device, download=False)
    if args.subset:
        if args.subset > len(image_data.train):
            raise UsageError(f"--subset {args.subset} is more than the "
                             f"{len(image_data.train)} training images")
        image_data.train = data.class_balanced_subset(image_data.train, args.subset,
                                                      image_data.num_classes)
    if len(image_data.train) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the "
                         f"{len(image_data.train)} training images")
    return image_data


def start_run(args, state: Optional[dict], runtime: Runtime):
    """Check everything, load the data, create --out (or check a resumed run against it), and
    announce the run. Returns the Run and the teacher read from --teacher-checkpoint, if any."""
    if state is None:
        args.out = runtime.share_from_main(args.out)  # the default name holds the time
        check_new_output(Path(args.out))
    if runtime.world_size > 1 and args.batch_size % runtime.world_size:
        raise UsageError(f"--batch-size {args.batch_size} does not split evenly over "
                         f"{runtime.world_size} processes")
    if args.sync_bn and runtime.world_size > 1 and runtime.device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices; PyTorch has no CPU SyncBatchNorm")
    if state is not None and state["hardware"] != describe_hardware(runtime):
        raise UsageError(f"this run was started on {state['hardware']['device_type']} in "
                         f"{state['hardware']['precision']}; it continues only there, not "
                         f"on {runtime.device.type} in {runtime.precision}")
    writer_class = tensorboard_writer_class() if args.tensorboard else None
    checkpoint = None
    if args.teacher_checkpoint and (state is None or state["phase"] == "teacher"):
        checkpoint = read_teacher_checkpoint(Path(args.teacher_checkpoint), args.teacher)

    image_data = load_data(args, runtime)
    loaded_teacher = None
    if checkpoint is not None:  # before --out is made, so that a misfit leaves nothing
        loaded_teacher = build_teacher(checkpoint, Path(args.teacher_checkpoint),
                                       args.teacher, image_data.num_classes)
    if state is None:
        state = start_output(args, runtime, image_data) if runtime.is_main else None
        state = runtime.share_from_main(state)
    elif describe_data(image_data) != state["data"]:
        saved, found = state["data"], describe_data(image_data)
        raise UsageError(
            f"--data-dir {args.data_dir} holds other data than this run was started with: "
            f"{found['train_images']} training and {found['test_images']} test images of "
            f"{len(found['classes'])} classes, against {saved['train_images']}, "
            f"{saved['test_images']} and {len(saved['classes'])}"
        )

    run = Run(args, runtime, image_data, state)
    if writer_class is not None and runtime.is_main:
        run.writer = writer_class(str(run.out / "tensorboard"))
    if args.resume and runtime.is_main:
        lines = "".join(json.dumps(entry) + "\n" for entry in state["metrics"])
        write_text_atomic(lines, run.out / "metrics.jsonl")

    classes = image_data.num_classes
    teacher_size = models.count_parameters(models.build_model(args.teacher, classes))
    student_size = models.count_parameters(models.build_model(args.student, classes))
    run.log(textwrap.fill(
        "config: " + ", ".join(f"{key}={value}" for key, value in vars(args).items()),
        width=99, subsequent_indent="  ",
    ))
    run.log(
        f"{runtime.describe()} | teacher {args.teacher} ({teacher_size / 1e6:.2f} M params), "
        f"student {args.student} ({student_size / 1e6:.2f} M params) | {image_data.source}: "
        f"{len(image_data.train)} train, {len(image_data.test)} test images, "
        f"{image_data.num_classes} classes | batch {args.batch_size}, "
        f"{run.steps_per_epoch} steps per epoch | out {run.out}"
    )
    if runtime.amp_dtype == torch.float16 and runtime.device.type == "cpu":
        run.log("note: --amp fp16 on a CPU runs far slower than --amp bf16 or off; it is "
                "meant for older CUDA devices")
    return run, loaded_teacher


def distil(run: Run, loaded_teacher: Optional[nn.Module]) -> None:
    """The phases still to do: teacher, student with distillation, and the baseline."""
    args, runtime = run.args, run.runtime
    teacher = obtain_teacher(run, loaded_teacher)
    teacher.eval()
    teacher.requires_grad_(False)
    run.log(f"teacher {args.teacher}: test top-1 "
            f"{100 * run.state['results']['teacher']['test_accuracy']:.2f}%")
    _, teacher_top_classes = predict_test_split(teacher, run.data, runtime,
                                                args.eval_batch_size)
    if runtime.compile:
        teacher = torch.compile(teacher)

    phases = [("student", teacher)] + ([("baseline", None)] if args.baseline else [])
    for index, (phase, phase_teacher) in enumerate(phases):
        if PHASES.index(run.state["phase"]) > PHASES.index(phase):
            continue  # finished before a resume
        student = run.build(args.student, phase)
        last = run.train_phase(phase, student, phase_teacher, teacher_top_classes)
        run.state["results"][phase] = {key: last.get(key) for key in
                                       ("test_accuracy", "agreement", "top5_overlap")}
        if runtime.is_main:
            save_atomic(model_checkpoint(args.student, student, run.data, args,
                                         last["test_accuracy"]), run.out / f"{phase}.pt")
        next_phase = phases[index + 1][0] if index + 1 < len(phases) else "done"
        run.state.update(phase=next_phase, phase_state=None)
        run.save_state()


def finish(run: Run) -> None:
    """The comparison table, peak memory and summary.json."""
    seconds = run.elapsed()
    run.log("")
    run.log(summary_table(run.args, run.state["results"], seconds))
    memory = peak_host_memory_gib()
    if memory is not None:
        gpu = ""
        if run.runtime.device.type == "cuda":
            gpu = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        run.log(f"peak host memory {memory:.2f} GiB{gpu}")
    if run.runtime.is_main:
        summary = {"results": run.state["results"], "seconds": seconds,
                   "peak_host_memory_gib": memory}
        write_text_atomic(json.dumps(summary, indent=2) + "\n", run.out / "summary.json")
    if run.writer is not None:
        run.writer.close()


def run_job(args: argparse.Namespace, given: dict) -> int:
    state = None
    if args.resume:
        state = read_resume_state(Path(args.out))
        args = restore_config(given, state)
        if state["phase"] == "done":
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{args.out} holds a finished run:\n"
                      + summary_table(args, state["results"], state["elapsed_seconds"]))
            return 0
    runtime = Runtime(args)
    try:
        run, loaded_teacher = start_run(args, state, runtime)
        distil(run, loaded_teacher)
        finish(run)
        return 0
    finally:
        runtime.close()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run_job(args, explicit_flags(argv))
    except UsageError as error:
        print(f"distill.py: error: {error}", file=sys.stderr)
        return 2
    except (data.DataError, CheckpointError, TrainingDiverged) as error:
        print(f"distill.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if (Path(args.out) / "resume.pt").exists():
            hint = f"continue with: python distill.py --resume --out {args.out}"
        else:
            hint = "nothing was saved yet; start the run again"
        print(f"\ninterrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
