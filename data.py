"""CIFAR-10 held on the training device, with augmentation on whole batches.

    from data import load_image_data, train_batches, test_batches
    data = load_image_data("./data", device)
    for images, labels in train_batches(data.train, 256, generator, data.normalize):
        ...

Each split is decoded once into a uint8 image tensor (N, 3, 32, 32) and an int64 label tensor,
both on the training device: 150 MB for the 50,000 CIFAR-10 training images. A training batch is
then one random permutation slice, one gather that does the random crop (4-pixel zero padding)
and the horizontal flip of every image at once, and one multiply-add that normalises. No worker
processes, no PIL and no host-to-device copies in the training loop.

Where the data come from (`load_image_data(data_dir, ...)`), first match wins:
1. `data_dir/cifar-10-batches-py`, the official release, read with torchvision's CIFAR10;
2. `data_dir/train/<class>/*` and `data_dir/test/<class>/*`, read with torchvision's ImageFolder
   (the JPEG copy of CIFAR-10 is one such tree); images of another size are resized;
3. torchvision's download of CIFAR-10 into `data_dir`.
If none works, DataError says what was looked for.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# Per-channel mean and standard deviation of the 50,000 official CIFAR-10 training images, pixel
# values in [0, 1]. (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) are ImageNet's, not these.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4  # pixels of zero padding on each side before the random crop


class DataError(Exception):
    """The data could not be found or read; the message is one line meant for the user."""


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: torch.Tensor) -> "Split":
        return Split(self.images[indices], self.labels[indices])


class Normalize:
    """uint8 images -> float32 (x / 255 - mean) / std, folded into one multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        std_tensor = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_tensor = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_tensor)
        self.shift = -mean_tensor / std_tensor
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last: the layout the convolutions run fastest in, on CPU and GPU alike.
        images = images.contiguous(memory_format=torch.channels_last)
        return torch.addcmul(self.shift, images.float(), self.scale)


@dataclass
class ImageData:
    train: Split
    test: Split
    classes: List[str]
    normalize: Normalize
    source: str  # where the images came from, for the startup line

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_image_data(
    data_dir: str,
    device: torch.device,
    image_size: int = 32,
    download: bool = True,
) -> ImageData:
    """Find, decode and move to `device` both splits of the data set in `data_dir`."""
    root = Path(data_dir).expanduser()
    if root.name == "cifar-10-batches-py":  # the user named the official folder itself
        root = root.parent
    official = root / "cifar-10-batches-py"
    if official.is_dir():
        return _load_official_cifar10(root, device, download=False)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return _load_image_folders(root, device, image_size)
    looked_for = (
        f"no data set in {data_dir}: looked for {official} (the official CIFAR-10 release) and "
        f"{root / 'train'} + {root / 'test'} (one folder of images per class)"
    )
    if not download:
        raise DataError(f"{looked_for}; pass --data-dir with one of them")
    existed = root.exists()
    try:
        return _load_official_cifar10(root, device, download=True)
    except DataError as error:
        if not existed and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # leave no empty folder behind from a download that never started
        raise DataError(
            f"{looked_for}, and could not download CIFAR-10 ({error}); pass --data-dir with "
            f"one of them"
        ) from None


def _load_official_cifar10(root: Path, device: torch.device, download: bool) -> ImageData:
    splits = []
    for train in (True, False):
        try:
            dataset = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
        except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ...
            if download:
                raise DataError(_one_line(error)) from None
            raise DataError(
                f"{root / 'cifar-10-batches-py'} is not a complete CIFAR-10 release (torchvision "
                f"cannot read it); delete it to download again, or pass --data-dir with a "
                f"complete copy"
            ) from None
        # dataset.data is (N, 32, 32, 3) uint8; the models take (N, 3, 32, 32).
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        splits.append(Split(images.to(device), torch.tensor(dataset.targets).to(device)))
    source = f"CIFAR-10 ({root / 'cifar-10-batches-py'})"
    return ImageData(
        splits[0], splits[1], list(CIFAR10_CLASSES), Normalize(CIFAR10_MEAN, CIFAR10_STD, device),
        source,
    )


def _load_image_folders(root: Path, device: torch.device, image_size: int) -> ImageData:
    splits, classes = [], None
    for split_name in ("train", "test"):
        try:
            folder = torchvision.datasets.ImageFolder(str(root / split_name))
        except (FileNotFoundError, OSError) as error:
            raise DataError(f"{root / split_name}: {_one_line(error)}") from None
        if classes is not None and folder.classes != classes:
            raise DataError(
                f"{root / 'train'} and {root / 'test'} hold different class folders: "
                f"{classes} vs {folder.classes}"
            )
        classes = folder.classes
        images = torch.empty(len(folder.samples), 3, image_size, image_size, dtype=torch.uint8)
        for index, (path, _) in enumerate(folder.samples):
            images[index] = _decode(folder.loader, path, image_size)
        labels = torch.tensor(folder.targets, dtype=torch.int64)
        splits.append(Split(images.to(device), labels.to(device)))

    if tuple(classes) == CIFAR10_CLASSES:
        mean, std, name = CIFAR10_MEAN, CIFAR10_STD, "CIFAR-10"
    else:
        mean, std = channel_statistics(splits[0].images)
        name = f"{len(classes)}-class image folders"
    normalize = Normalize(mean, std, device)
    return ImageData(splits[0], splits[1], classes, normalize, f"{name} ({root})")


def _decode(loader: Callable, path: str, image_size: int) -> torch.Tensor:
    # ImageFolder's loader opens the file with PIL and converts it to RGB; torchvision.io's
    # decoders are deprecated from torchvision 0.29 on.
    try:
        image = TF.pil_to_tensor(loader(path))  # (3, H, W) uint8
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {_one_line(error)}") from None
    if image.shape[1:] != (image_size, image_size):
        image = TF.resize(image, [image_size, image_size], antialias=True)
    return image


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def channel_statistics(images: torch.Tensor, chunk: int = 4096) -> Tuple[tuple, tuple]:
    """Per-channel mean and standard deviation of uint8 images, as pixel values in [0, 1]."""
    total = torch.zeros(3, dtype=torch.float64, device=images.device)
    total_squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        pixels = images[start:start + chunk].double().div_(255.0)
        total += pixels.sum(dim=(0, 2, 3))
        total_squares += pixels.square().sum(dim=(0, 2, 3))
    count = images.numel() // 3
    mean = total / count
    std = (total_squares / count - mean.square()).clamp(min=1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def class_balanced_subset(split: Split, size: int, num_classes: int, seed: int = 0) -> Split:
    """`size` images with the classes as equal as they can be, the same for every run."""
    if not 0 < size <= len(split):
        raise DataError(f"a subset must hold between 1 and {len(split)} images, got {size}")
    generator = torch.Generator().manual_seed(seed)
    labels = split.labels.cpu()
    order = torch.randperm(len(labels), generator=generator)
    per_class = [order[labels[order] == c] for c in range(num_classes)]
    chosen, remaining = [], size
    # Deal the images out one class at a time, so any remainder falls on the first classes.
    for take in range(max(len(members) for members in per_class)):
        for members in per_class:
            if remaining and take < len(members):
                chosen.append(members[take])
                remaining -= 1
    indices = torch.stack(chosen).sort().values.to(split.labels.device)
    return split.select(indices)


def draw_crops(batch: int, generator: torch.Generator, device: torch.device):
    """Each image's crop offsets (top, left in [0, 8]) and whether it is mirrored (p = 0.5)."""
    offsets = 2 * CROP_PADDING + 1
    top = torch.randint(0, offsets, (batch,), device=device, generator=generator)
    left = torch.randint(0, offsets, (batch,), device=device, generator=generator)
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    return top, left, flip


def crop_and_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
    """Cut each image's crop from the zero-padded batch and mirror the flipped ones.

    A strided view of the padded batch holds every crop of every image without copying; one
    gather picks each image's own. Works on any dtype and device; on the CPU it takes about
    1 ms for 256 CIFAR-10 images.
    """
    batch, channels, height, width = images.shape
    offsets = 2 * CROP_PADDING + 1
    padded = torch.nn.functional.pad(images, [CROP_PADDING] * 4)
    image_stride, channel_stride, row_stride, column_stride = padded.stride()
    crops = padded.as_strided(  # (batch, top, left, channels, height, width)
        (batch, offsets, offsets, channels, height, width),
        (image_stride, row_stride, column_stride, channel_stride, row_stride, column_stride),
    )[torch.arange(batch, device=images.device), top, left]
    return torch.where(flip.view(batch, 1, 1, 1), crops.flip(3), crops)


def random_crop_and_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding=4) and RandomHorizontalFlip(0.5) on every image of a batch."""
    return crop_and_flip(images, *draw_crops(len(images), generator, images.device))


def train_batches(
    split: Split,
    batch_size: int,
    generator: torch.Generator,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of augmented, normalised batches of a fresh random permutation.

    `batch_size` is the global batch; the last incomplete batch is dropped. Under data-parallel
    training every rank draws the same permutation and crops for the whole batch from the same
    generator state, then cuts and keeps only every `world_size`-th image, so the ranks
    together see exactly the batches one process would.
    """
    device = split.labels.device
    permutation = torch.randperm(len(split), device=device, generator=generator)
    for step in range(len(split) // batch_size):
        indices = permutation[step * batch_size:(step + 1) * batch_size]
        draws = draw_crops(batch_size, generator, device)
        mine = slice(rank, None, world_size)
        images = crop_and_flip(split.images[indices[mine]], *(draw[mine] for draw in draws))
        yield normalize(images), split.labels[indices[mine]]


def test_batches(
    split: Split,
    batch_size: int,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The test split in order, never augmented; rank r takes images r, r + world_size, ..."""
    indices = torch.arange(rank, len(split), world_size, device=split.labels.device)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        yield normalize(split.images[batch]), split.labels[batch]


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A random stream on `device` for shuffling and augmentation, separate from the global one."""
    return torch.Generator(device=device).manual_seed(seed)
