"""Tests of bench.py: the usual recipe optimises the same loss, and a tiny run reports every
figure the README quotes.

    python -m unittest test_bench -v
"""
import contextlib
import io
import json
import tempfile
import unittest
from pathlib import Path

import torch

import bench
import loss
from test_data import make_image_folder


class TestTextbookLoss(unittest.TestCase):
    def test_textbook_loss_equals_the_projects_loss(self):
        # The contenders must optimise the same objective for the speed comparison to be fair.
        generator = torch.Generator().manual_seed(0)
        student = torch.randn(32, 10, generator=generator) * 3
        teacher = torch.randn(32, 10, generator=generator) * 3
        labels = torch.randint(10, (32,), generator=generator)
        ours = loss.KLDivLossWithTemperature(bench.TEMPERATURE, bench.ALPHA)
        torch.testing.assert_close(bench.textbook_loss(student, teacher, labels),
                                   ours(student, teacher, labels))


class TestTinyRun(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.temporary = tempfile.TemporaryDirectory()
        data_dir = make_image_folder(Path(cls.temporary.name) / "data", train_per_class=20,
                                     test_per_class=2)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            cls.status = bench.main([
                "--data-dir", str(data_dir), "--teacher", "tinycnn", "--student", "tinycnn",
                "--batch-size", "16", "--rounds", "2", "--steps", "2", "--workers", "0",
                "--gpu-report",
            ])
        cls.output = stdout.getvalue()
        cls.result = json.loads(cls.output.strip().splitlines()[-1])

    @classmethod
    def tearDownClass(cls):
        cls.temporary.cleanup()

    def test_run_succeeds_and_ends_with_one_json_line(self):
        self.assertEqual(self.status, 0)
        self.assertEqual(set(self.result["images_per_second"]),
                         {"project", "usual", "bound", "fp32 step"})

    def test_ratios_are_those_of_the_printed_rates(self):
        rates = self.result["images_per_second"]
        self.assertAlmostEqual(self.result["project_vs_usual"],
                               rates["project"] / rates["usual"], delta=0.01)
        self.assertAlmostEqual(self.result["project_vs_bound"],
                               rates["project"] / rates["bound"], delta=0.01)
        self.assertAlmostEqual(self.result["fp32_step_vs_usual"],
                               rates["fp32 step"] / rates["usual"], delta=0.01)

    def test_report_has_teacher_share_memory_and_epoch_times(self):
        self.assertGreater(self.result["teacher_forward_share"], 0)
        self.assertLess(self.result["teacher_forward_share"], 1)
        self.assertGreater(self.result["peak_memory_gib"], 0)
        self.assertEqual(set(self.result["epoch_seconds"]), {"teacher", "distillation"})
        self.assertIsNone(self.result["mfu"])  # no known peak for a CPU

    def test_work_per_image_counts_the_teacher_once_and_the_student_three_times(self):
        tiny = 2 * 10_323_200 / 1e9  # tinycnn forward: 10.3 M multiply-adds per image
        self.assertAlmostEqual(self.result["gflop_per_image"], 4 * tiny, delta=0.05 * tiny)

    def test_table_is_printed(self):
        for line in ("project / usual", "project / bound", "teacher forward", "one teacher epoch"):
            self.assertIn(line, self.output)


if __name__ == "__main__":
    unittest.main()
