"""Tests of data.py on synthetic images written to a temporary folder.

    python -m unittest test_data -v

`make_image_folder` is also used by the other test files for small end-to-end runs.
"""
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy
import torch
import torchvision
from PIL import Image

import data

CPU = torch.device("cpu")


def make_image_folder(root, classes=("ant", "bee", "cat"), train_per_class=40,
                      test_per_class=10, size=32, seed=0, jpeg=False):
    """root/train/<class>/*.png and root/test/<class>/*.png: each class a colour plus noise,
    so a small network learns them in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    root = Path(root)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = torch.tensor([(index * 97) % 256, (index * 53 + 80) % 256,
                                   (255 - index * 71) % 256], dtype=torch.float32)
            for number in range(count):
                noise = torch.randn(3, size, size, generator=generator) * 25
                image = (colour.view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
                picture = Image.fromarray(image.permute(1, 2, 0).numpy())
                picture.save(folder / f"{number:04d}.{'jpg' if jpeg else 'png'}")
    return root


class TemporaryFolderTest(unittest.TestCase):
    def setUp(self):
        temporary = tempfile.TemporaryDirectory()
        self.addCleanup(temporary.cleanup)
        self.folder = Path(temporary.name)


class TestLoading(TemporaryFolderTest):
    def test_image_folders_are_decoded_to_uint8_tensors_with_their_labels(self):
        make_image_folder(self.folder, train_per_class=4, test_per_class=2)
        image_data = data.load_image_data(str(self.folder), CPU)
        self.assertEqual(image_data.train.images.shape, (12, 3, 32, 32))
        self.assertEqual(image_data.train.images.dtype, torch.uint8)
        self.assertEqual(image_data.train.labels.tolist(), [0] * 4 + [1] * 4 + [2] * 4)
        self.assertEqual(len(image_data.test), 6)
        self.assertEqual(image_data.classes, ["ant", "bee", "cat"])

    def test_decoded_pixels_equal_the_written_ones(self):
        make_image_folder(self.folder, train_per_class=1, test_per_class=1)
        image_data = data.load_image_data(str(self.folder), CPU)
        with Image.open(self.folder / "train" / "bee" / "0000.png") as picture:
            written = torch.from_numpy(numpy.array(picture.convert("RGB"))).permute(2, 0, 1)
        self.assertTrue(torch.equal(image_data.train.images[1], written))

    def test_images_of_another_size_are_resized(self):
        make_image_folder(self.folder, train_per_class=2, test_per_class=1, size=48, jpeg=True)
        image_data = data.load_image_data(str(self.folder), CPU)
        self.assertEqual(image_data.train.images.shape[1:], (3, 32, 32))

    def test_cifar10_class_names_get_the_cifar10_statistics(self):
        make_image_folder(self.folder, classes=data.CIFAR10_CLASSES, train_per_class=1,
                          test_per_class=1)
        image_data = data.load_image_data(str(self.folder), CPU)
        self.assertEqual(image_data.normalize.mean, data.CIFAR10_MEAN)
        self.assertEqual(image_data.normalize.std, data.CIFAR10_STD)

    def test_other_image_folders_get_their_own_training_statistics(self):
        make_image_folder(self.folder, train_per_class=5, test_per_class=1)
        image_data = data.load_image_data(str(self.folder), CPU)
        pixels = image_data.train.images.double() / 255
        torch.testing.assert_close(torch.tensor(image_data.normalize.mean, dtype=torch.float64),
                                   pixels.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(torch.tensor(image_data.normalize.std, dtype=torch.float64),
                                   pixels.transpose(0, 1).reshape(3, -1).std(dim=1,
                                                                             unbiased=False))

    def test_official_folder_comes_first_and_is_read_with_torchvision(self):
        make_image_folder(self.folder, train_per_class=1, test_per_class=1)
        (self.folder / "cifar-10-batches-py").mkdir()
        fake = mock.MagicMock()
        fake.return_value.data = torch.zeros(4, 32, 32, 3, dtype=torch.uint8).numpy()
        fake.return_value.targets = [0, 1, 2, 3]
        with mock.patch.object(torchvision.datasets, "CIFAR10", fake):
            image_data = data.load_image_data(str(self.folder), CPU)
        self.assertEqual(fake.call_args.kwargs["download"], False)
        self.assertEqual(image_data.train.images.shape, (4, 3, 32, 32))
        self.assertEqual(image_data.classes, list(data.CIFAR10_CLASSES))

    def test_download_is_tried_last_and_its_failure_is_one_clear_line(self):
        missing = self.folder / "nothing-here"
        refuse = mock.MagicMock(side_effect=OSError("network is unreachable"))
        with mock.patch.object(torchvision.datasets, "CIFAR10", refuse):
            with self.assertRaises(data.DataError) as caught:
                data.load_image_data(str(missing), CPU)
        message = str(caught.exception)
        self.assertEqual(refuse.call_args.kwargs["download"], True)
        self.assertNotIn("\n", message)
        self.assertIn("cifar-10-batches-py", message)
        self.assertIn("network is unreachable", message)
        self.assertIn("--data-dir", message)

    def test_no_download_when_told_not_to(self):
        with self.assertRaisesRegex(data.DataError, "looked for"):
            data.load_image_data(str(self.folder), CPU, download=False)

    def test_unreadable_image_names_the_file(self):
        make_image_folder(self.folder, train_per_class=1, test_per_class=1)
        broken = self.folder / "train" / "ant" / "0000.png"
        broken.write_bytes(b"not an image")
        with self.assertRaisesRegex(data.DataError, "0000.png"):
            data.load_image_data(str(self.folder), CPU)

    def test_train_and_test_must_hold_the_same_classes(self):
        make_image_folder(self.folder, train_per_class=1, test_per_class=1)
        make_image_folder(self.folder / "extra", train_per_class=1, test_per_class=1,
                          classes=("dog",))
        (self.folder / "extra" / "test" / "dog").rename(self.folder / "test" / "dog")
        with self.assertRaisesRegex(data.DataError, "different class folders"):
            data.load_image_data(str(self.folder), CPU)


def small_split(count=20, num_classes=4, size=8):
    images = torch.arange(count * 3 * size * size, dtype=torch.int64) % 251
    images = images.view(count, 3, size, size).to(torch.uint8)
    return data.Split(images, torch.arange(count) % num_classes)


class TestSubset(unittest.TestCase):
    def test_subset_is_class_balanced(self):
        split = data.Split(torch.zeros(100, 3, 2, 2, dtype=torch.uint8),
                           torch.arange(100) % 10)
        subset = data.class_balanced_subset(split, 23, 10)
        self.assertEqual(subset.labels.bincount(minlength=10).tolist(),
                         [3, 3, 3] + [2] * 7)

    def test_subset_is_the_same_every_time(self):
        split = small_split(40)
        first = data.class_balanced_subset(split, 10, 4)
        second = data.class_balanced_subset(split, 10, 4)
        self.assertTrue(torch.equal(first.images, second.images))

    def test_subset_larger_than_the_split_is_rejected(self):
        with self.assertRaisesRegex(data.DataError, "between 1 and 20 images, got 21"):
            data.class_balanced_subset(small_split(20), 21, 4)


class TestAugmentation(unittest.TestCase):
    def test_every_image_is_a_padded_crop_possibly_mirrored(self):
        images = small_split(16).images
        padded = torch.nn.functional.pad(images, [4, 4, 4, 4])
        out = data.random_crop_and_flip(images, torch.Generator().manual_seed(0))
        for index in range(len(images)):
            candidates = [
                window
                for top in range(9) for left in range(9)
                for window in (padded[index, :, top:top + 8, left:left + 8],)
                for window in (window, window.flip(2))
            ]
            with self.subTest(index=index):
                self.assertTrue(any(torch.equal(out[index], c) for c in candidates))

    def test_offsets_cover_the_whole_range_and_half_the_images_are_flipped(self):
        # Pixel values 1 + row in channel 0 and 1 + column in channel 1 tell where each output
        # pixel was read from; padding reads 0.
        size = 8
        coordinates = torch.arange(1, size + 1, dtype=torch.uint8)
        image = torch.stack([coordinates.view(size, 1).expand(size, size),
                             coordinates.view(1, size).expand(size, size),
                             torch.zeros(size, size, dtype=torch.uint8)])
        out = data.random_crop_and_flip(image.repeat(2000, 1, 1, 1),
                                        torch.Generator().manual_seed(1))
        tops, lefts, flipped = set(), set(), 0
        for crop in out:
            row, column = torch.nonzero(crop[0] * crop[1])[0].tolist()  # an inside pixel
            tops.add(crop[0, row, column].item() - 1 - row + 4)
            source_columns = crop[1, row][crop[1, row] > 0]
            is_flipped = len(source_columns) > 1 and source_columns[0] > source_columns[-1]
            flipped += int(is_flipped)
            first = crop[1, row, column].item() - 1
            lefts.add(first + column + 4 - (size - 1) if is_flipped else first - column + 4)
        self.assertEqual(tops, set(range(9)))
        self.assertEqual(lefts, set(range(9)))
        self.assertAlmostEqual(flipped / len(out), 0.5, delta=0.05)

    def test_same_seed_same_batches(self):
        split = small_split(20)
        normalize = data.Normalize((0.5,) * 3, (0.25,) * 3, CPU)
        first = list(data.train_batches(split, 5, torch.Generator().manual_seed(3), normalize))
        second = list(data.train_batches(split, 5, torch.Generator().manual_seed(3), normalize))
        for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
            self.assertTrue(torch.equal(images_a, images_b))
            self.assertTrue(torch.equal(labels_a, labels_b))

    def test_an_epoch_visits_each_image_once_and_drops_the_incomplete_batch(self):
        split = data.Split(torch.zeros(23, 3, 4, 4, dtype=torch.uint8), torch.arange(23))
        batches = list(data.train_batches(split, 5, torch.Generator().manual_seed(0),
                                          lambda images: images))
        labels = torch.cat([labels for _, labels in batches])
        self.assertEqual(len(batches), 4)
        self.assertEqual(len(set(labels.tolist())), 20)

    def test_ranks_together_see_exactly_the_single_process_batches(self):
        split = small_split(24)
        normalize = data.Normalize((0.5,) * 3, (0.25,) * 3, CPU)
        single = list(data.train_batches(split, 8, torch.Generator().manual_seed(5), normalize))
        for rank in range(2):
            sharded = list(data.train_batches(split, 8, torch.Generator().manual_seed(5),
                                              normalize, rank=rank, world_size=2))
            for (whole_images, whole_labels), (images, labels) in zip(single, sharded):
                self.assertTrue(torch.equal(images, whole_images[rank::2]))
                self.assertTrue(torch.equal(labels, whole_labels[rank::2]))

    def test_normalize_uses_mean_and_std_and_gives_channels_last_float32(self):
        normalize = data.Normalize(data.CIFAR10_MEAN, data.CIFAR10_STD, CPU)
        images = small_split(4).images
        out = normalize(images)
        mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(out, (images.float() / 255 - mean) / std)
        self.assertEqual(out.dtype, torch.float32)
        self.assertTrue(out.is_contiguous(memory_format=torch.channels_last))


class TestTestBatches(unittest.TestCase):
    def test_test_batches_are_in_order_and_never_augmented(self):
        split = small_split(10)
        batches = list(data.test_batches(split, 4, lambda images: images))
        self.assertEqual([len(labels) for _, labels in batches], [4, 4, 2])
        self.assertTrue(torch.equal(torch.cat([images for images, _ in batches]), split.images))

    def test_ranks_split_the_test_set_counting_each_image_once(self):
        split = data.Split(torch.zeros(11, 3, 2, 2, dtype=torch.uint8), torch.arange(11))
        seen = []
        for rank in range(3):
            for _, labels in data.test_batches(split, 2, lambda images: images, rank, 3):
                seen += labels.tolist()
        self.assertEqual(sorted(seen), list(range(11)))


if __name__ == "__main__":
    unittest.main()
