"""How fast is the distillation step? Four contenders measured side by side, in one run.

    python bench.py --quick                            # synthetic images, under a minute
    python bench.py --data-dir /tmp/cifar10-jpeg       # the README's table
    python bench.py --gpu-report --data-dir DATA       # on a GPU: adds epoch times and MFU

1. project: the step as distill.py runs it: uint8 images held on the device, crop and flip on
   whole batches there, channels_last, autocast (bf16 where the hardware has it), loss.py's
   loss, fused SGD, no host-device synchronisation until the end.
2. usual: torchvision's dataset with PIL transforms (RandomCrop(32, padding=4),
   RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader with worker processes (and pinned
   memory on a GPU), float32, the textbook loss, and `loss.item()` every step for the log.
3. bound: the project's models, precision and loss on one batch already on the device:
   forward, backward and optimizer step and nothing else; the fastest the step can be.
4. fp32 step: the same bare step in the usual recipe's float32 and memory layout. fp32 step /
   usual is what the usual recipe loses to its data loading; bound / fp32 step, what it loses
   to its precision and layout.

The contenders take turns in rounds, each round starting one contender later, so that noise
from other work on the machine hits them alike; each figure is the median over the rounds.
The teacher's share is the time of its forward alone over the bound step time.
"""
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

import data
import distill
import loss
import models

# Dense bf16 tensor-core peaks from NVIDIA's data sheets, in FLOP/s, for MFU; the longest name
# found in the device's name wins, so "H100 PCIe" is not taken for "H100" (the SXM card).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}
TEMPERATURE, ALPHA = 4.0, 0.7


def textbook_loss(student_logits, teacher_logits, labels, temperature=TEMPERATURE, alpha=ALPHA):
    """The loss as tutorials write it: nn.KLDivLoss on log-probabilities against
    probabilities. Same value as loss.py in float32; kept separate because that is the point."""
    soft = nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits / temperature, dim=1),
    )
    return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def make_synthetic_folder(root: Path, images: int, seed: int = 0) -> Path:
    """A CIFAR-10-sized JPEG ImageFolder of random images, train and test, 10 classes."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", images), ("test", max(images // 10, 10))):
        for index in range(count):
            folder = root / split / f"class{index % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{index:05d}.jpg", quality=90)
    return root


class Models:
    """A frozen teacher and a student, the way a contender wants them laid out."""

    def __init__(self, teacher_name, student_name, num_classes, device, channels_last):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(0)
        self.teacher = models.build_model(teacher_name, num_classes)
        self.teacher = self.teacher.to(device, memory_format=memory_format).eval()
        self.teacher.requires_grad_(False)
        self.student = models.build_model(student_name, num_classes)
        self.student = self.student.to(device, memory_format=memory_format).train()


class Contender:
    name = ""

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps, the device synchronised at both ends."""
        raise NotImplementedError


class ProjectStep(Contender):
    name = "project"

    def __init__(self, args, runtime, image_data):
        self.args, self.runtime, self.data = args, runtime, image_data
        self.nets = Models(args.teacher, args.student, image_data.num_classes, runtime.device,
                           channels_last=True)
        self.optimizer = distill.make_optimizer(self.nets.student, 0.05, 5e-4, runtime.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.scaler = runtime.make_scaler()
        self.generator = data.make_generator(0, runtime.device)
        self.criterion = loss.KLDivLossWithTemperature(TEMPERATURE, ALPHA)
        self.student, self.teacher = self.nets.student, self.nets.teacher
        if args.compile:
            self.student, self.teacher = torch.compile(self.student), torch.compile(self.teacher)

    def endless_batches(self):
        while True:
            yield from data.train_batches(self.data.train, self.args.batch_size,
                                          self.generator, self.data.normalize)

    def run(self, steps):
        batches = self.endless_batches()
        synchronize(self.runtime.device)
        started = time.perf_counter()
        # train_epoch reads its totals back at the end, which waits for the device.
        distill.train_epoch(self.student, self.teacher, self.criterion, self.optimizer,
                            self.scheduler, self.scaler, itertools.islice(batches, steps), steps,
                            self.runtime)
        return time.perf_counter() - started


class UsualStep(Contender):
    name = "usual"

    def __init__(self, args, device, data_dir, num_classes, mean, std):
        self.device = device
        self.nets = Models(args.teacher, args.student, num_classes, device, channels_last=False)
        self.optimizer = torch.optim.SGD(self.nets.student.parameters(), lr=0.05, momentum=0.9,
                                         nesterov=True, weight_decay=5e-4)
        augment = transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])
        root = Path(data_dir)
        if root.name == "cifar-10-batches-py":  # as data.py, accept the official folder itself
            root = root.parent
        if (root / "cifar-10-batches-py").is_dir():
            dataset = torchvision.datasets.CIFAR10(str(root), train=True, transform=augment)
        else:
            dataset = torchvision.datasets.ImageFolder(str(root / "train"), augment)
        # Fresh workers every round, shut down after it: persistent ones would refill their
        # queues while the next contender is being timed, and start each round with free
        # batches.
        self.loader = DataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
            num_workers=args.workers, pin_memory=device.type == "cuda",
        )
        self.losses = []

    def step(self, batches):
        images, labels = next(batches)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.no_grad():
            teacher_logits = self.nets.teacher(images)
        total = textbook_loss(self.nets.student(images), teacher_logits, labels)
        self.optimizer.zero_grad()
        total.backward()
        self.optimizer.step()
        self.losses.append(total.item())  # the running loss tutorials print

    def endless_batches(self):
        while True:
            yield from self.loader

    def run(self, steps):
        batches = self.endless_batches()
        for _ in range(max(self.loader.num_workers, 1)):  # worker start-up, untimed
            self.step(batches)
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            self.step(batches)
        synchronize(self.device)
        seconds = time.perf_counter() - started
        batches.close()  # stops the workers
        return seconds


class BoundStep(Contender):
    """The model step alone. As "bound", with the project's precision and layout; as "fp32
    step", with the usual recipe's (float32, contiguous), which splits the usual recipe's gap to
    the project into what its data loading costs and what its precision costs."""

    def __init__(self, args, runtime, image_data, name="bound", channels_last=True):
        self.name, self.runtime = name, runtime
        self.nets = Models(args.teacher, args.student, image_data.num_classes, runtime.device,
                           channels_last=channels_last)
        self.optimizer = distill.make_optimizer(self.nets.student, 0.05, 5e-4, runtime.device)
        self.scaler = runtime.make_scaler()
        self.criterion = loss.KLDivLossWithTemperature(TEMPERATURE, ALPHA)
        batches = data.train_batches(image_data.train, args.batch_size,
                                     data.make_generator(1, runtime.device), image_data.normalize)
        self.images, self.labels = next(batches)
        if not channels_last:
            self.images = self.images.contiguous()
        self.student, self.teacher = self.nets.student, self.nets.teacher
        if args.compile:
            self.student, self.teacher = torch.compile(self.student), torch.compile(self.teacher)

    def step(self):
        with self.runtime.autocast():
            with torch.no_grad():
                teacher_logits = self.teacher(self.images)
            student_logits = self.student(self.images)
        total = self.criterion(student_logits, teacher_logits, self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def teacher_forward(self):
        with torch.no_grad(), self.runtime.autocast():
            self.teacher(self.images)

    def timed(self, function, steps):
        synchronize(self.runtime.device)
        started = time.perf_counter()
        for _ in range(steps):
            function()
        synchronize(self.runtime.device)
        return time.perf_counter() - started

    def run(self, steps):
        return self.timed(self.step, steps)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return distill.peak_host_memory_gib() or float("nan")


def measure(contenders, batch_size, rounds, steps, warmup_steps, device) -> Dict[str, dict]:
    """Images per second of each contender: median and spread over interleaved rounds."""
    for contender in contenders:
        contender.run(warmup_steps)
    rates = {contender.name: [] for contender in contenders}
    for round_index in range(rounds):
        # Each round starts one contender later, so that none always runs after the same one:
        # a step runs measurably slower right after some others (caches, memory).
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            seconds = contender.run(steps)
            rates[contender.name].append(steps * batch_size / seconds)
    return {name: {"median": statistics.median(values), "min": min(values), "max": max(values)}
            for name, values in rates.items()}


def flops_per_image(teacher: nn.Module, student: nn.Module, device) -> float:
    """Teacher forward + student forward and backward (counted as twice the forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = torch.zeros(2, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher(sample)
            student(sample)
    teacher_and_student = counter.get_total_flops() / 2
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            student(sample)
    return teacher_and_student + 2 * counter.get_total_flops() / 2


def device_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_BF16_FLOPS if key in name]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def epoch_seconds(args, runtime, image_data) -> Dict[str, float]:
    """One teacher epoch (cross-entropy) and one distillation epoch on the whole training split,
    through distill.py's train_epoch, eager (--compile is not applied), evaluation left out."""
    nets = Models(args.teacher, args.student, image_data.num_classes, runtime.device, True)
    nets.teacher.train().requires_grad_(True)
    steps = len(image_data.train) // args.batch_size
    seconds = {}
    for phase, model, teacher in (("teacher", nets.teacher, None),
                                  ("distillation", nets.student, nets.teacher)):
        optimizer = distill.make_optimizer(model, 0.05, 5e-4, runtime.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        batches = data.train_batches(image_data.train, args.batch_size,
                                     data.make_generator(0, runtime.device), image_data.normalize)
        synchronize(runtime.device)
        started = time.perf_counter()
        distill.train_epoch(model, teacher, loss.KLDivLossWithTemperature(), optimizer,
                            scheduler, runtime.make_scaler(), batches, steps, runtime)
        seconds[phase] = time.perf_counter() - started
    return seconds


def build_parser():
    parser = distill.OneLineErrorParser(
        prog="bench.py",
        description="Images/sec of the project's distillation step, the usual DataLoader "
                    "recipe and the bare model step, measured side by side.",
        formatter_class=distill.DefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", help="CIFAR-10 as distill.py takes it (default: "
                                           "synthetic JPEG images in a temporary folder)")
    parser.add_argument("--teacher", choices=sorted(models.MODELS),
                        help="default: resnet18 on a GPU, resnet20 on a CPU")
    parser.add_argument("--student", choices=sorted(models.MODELS),
                        help="default: resnet20 on a GPU, tinycnn on a CPU")
    parser.add_argument("--batch-size", type=distill.positive_int, default=256,
                        help="images per step, for every contender")
    parser.add_argument("--rounds", type=distill.positive_int, help="default 6 quick, 8 full")
    parser.add_argument("--steps", type=distill.positive_int,
                        help="timed steps per contender per round (default 4 quick, 20 full)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader worker processes of the usual recipe")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                        help="as in distill.py: auto is CUDA, else MPS, else CPU")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                        help="precision of the project and bound steps, as in distill.py")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the project's and the bound's models")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--gpu-report", action="store_true",
                        help="also time one teacher and one distillation epoch on the whole "
                             "training split and compute MFU; meant for a GPU")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_benchmark(args)
    except (distill.UsageError, data.DataError) as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        return 2


def run_benchmark(args) -> int:
    runtime = distill.Runtime(distill.parse_args(["--device", args.device, "--amp", args.amp]))
    runtime.compile = args.compile
    device = runtime.device
    on_gpu = device.type == "cuda"
    args.teacher = args.teacher or ("resnet18" if on_gpu else "resnet20")
    args.student = args.student or ("resnet20" if on_gpu else "tinycnn")
    rounds = args.rounds or (6 if args.quick else 8)
    steps = args.steps or (4 if args.quick else 20)

    with tempfile.TemporaryDirectory() as temporary:
        if args.data_dir is None:
            synthetic_images = args.batch_size * (steps + args.workers + 2)
            if args.gpu_report:
                synthetic_images = 50_000  # an epoch of full CIFAR-10's size
            data_dir = make_synthetic_folder(Path(temporary), synthetic_images)
            source = f"synthetic JPEG images ({synthetic_images})"
        else:
            data_dir = Path(args.data_dir)
        image_data = data.load_image_data(str(data_dir), device, download=False)
        if args.data_dir is not None:
            source = image_data.source
        if len(image_data.train) < args.batch_size * 2:
            raise distill.UsageError(f"{source} holds too few training images for --batch-size "
                                     f"{args.batch_size}")

        fp32_runtime = distill.Runtime(distill.parse_args(["--device", args.device,
                                                           "--amp", "off"]))
        contenders = [
            ProjectStep(args, runtime, image_data),
            UsualStep(args, device, data_dir, image_data.num_classes,
                      image_data.normalize.mean, image_data.normalize.std),
            BoundStep(args, runtime, image_data),
            BoundStep(args, fp32_runtime, image_data, name="fp32 step", channels_last=False),
        ]
        print(f"bench.py: {runtime.describe()} | teacher {args.teacher}, student "
              f"{args.student} | batch {args.batch_size} | {source} | usual: "
              f"{args.workers} DataLoader workers, fp32 | {rounds} rounds of {steps} steps, "
              f"torch {torch.__version__}", flush=True)
        rates = measure(contenders, args.batch_size, rounds, steps,
                        warmup_steps=10 if args.compile else 2, device=device)

        bound = contenders[2]
        step_seconds = bound.run(steps) / steps
        teacher_seconds = bound.timed(bound.teacher_forward, steps) / steps
        result = {
            "device": runtime.describe(), "teacher": args.teacher, "student": args.student,
            "batch_size": args.batch_size, "data": source, "torch": torch.__version__,
            "images_per_second": {name: round(rate["median"], 1) for name, rate in rates.items()},
            "project_vs_usual": rates["project"]["median"] / rates["usual"]["median"],
            "project_vs_bound": rates["project"]["median"] / rates["bound"]["median"],
            "fp32_step_vs_usual": rates["fp32 step"]["median"] / rates["usual"]["median"],
            "teacher_forward_share": teacher_seconds / step_seconds,
            "peak_memory_gib": peak_memory_gib(device),
        }
        if args.gpu_report:
            result["epoch_seconds"] = epoch_seconds(args, runtime, image_data)
            flops = flops_per_image(bound.nets.teacher, bound.nets.student, device)
            peak = device_peak_flops(device)
            result["gflop_per_image"] = flops / 1e9
            result["mfu"] = {name: rate["median"] * flops / peak for name, rate in rates.items()
                             } if peak else None
        print_table(result, rates)
        print(json.dumps(result))
    return 0


def print_table(result, rates):
    print(f"{'contender':<12} {'images/s':>10} {'min':>10} {'max':>10}")
    for name, rate in rates.items():
        print(f"{name:<12} {rate['median']:10.0f} {rate['min']:10.0f} {rate['max']:10.0f}")
    print(f"project / usual  {result['project_vs_usual']:.2f}x")
    print(f"project / bound  {100 * result['project_vs_bound']:.1f}%")
    print(f"fp32 step / usual {result['fp32_step_vs_usual']:.2f}x (the usual recipe's data "
          f"loading)")
    print(f"teacher forward  {100 * result['teacher_forward_share']:.1f}% of the bound step")
    print(f"peak memory      {result['peak_memory_gib']:.2f} GiB")
    for phase, seconds in result.get("epoch_seconds", {}).items():
        print(f"one {phase} epoch  {seconds:.1f} s")
    if "gflop_per_image" in result:
        print(f"work per image   {result['gflop_per_image']:.3f} GFLOP (teacher forward, student "
              f"forward and backward)")
        if result["mfu"]:
            print("MFU (of the bf16 peak) " + ", ".join(
                f"{name} {100 * value:.1f}%" for name, value in result["mfu"].items()))
        else:
            print("MFU              unknown peak for this device")


if __name__ == "__main__":
    sys.exit(main())
