"""Tests of distill.py under torchrun: two CPU processes talking through gloo, on synthetic images.

    python -m unittest test_distributed -v

The tests launch this file itself with torchrun (and once without, as the single-process
reference). Run as a script, it adds `plaincnn`, a small network without batch norm, to the
model registry: batch norm computes its statistics over each process's share of the batch, so
only a network without it can give the single-process losses exactly. It then runs
`distill.main` and saves each process's final weights as PHASE-rankN.pt in the run folder.
Setting STOP_AFTER=PHASE:EPOCH stops every process like Ctrl-C once that epoch is saved.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
TOLERANCE = dict(rtol=1e-4, atol=1e-5)
COMPARED_METRICS = ("loss", "kd_loss", "ce_loss", "train_accuracy", "test_accuracy",
                    "agreement", "top5_overlap", "lr", "temperature", "alpha", "test_images")


def plain_cnn(num_classes):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, num_classes),
    )


def worker(arguments):
    import distill
    import models

    models.MODELS["plaincnn"] = plain_cnn
    rank = int(os.environ.get("RANK", "0"))
    original_phase = distill.Run.train_phase

    def train_phase_then_save(run, phase, model, *rest):
        result = original_phase(run, phase, model, *rest)
        torch.save(distill.plain_state_dict(model.state_dict()),
                   Path(run.out) / f"{phase}-rank{rank}.pt")
        return result

    distill.Run.train_phase = train_phase_then_save
    stop_after = os.environ.get("STOP_AFTER")
    if stop_after:
        stop_phase, stop_epoch = stop_after.split(":")
        original_save = distill.Run.save_state

        def save_then_stop(run, *rest):
            original_save(run, *rest)
            state = run.state["phase_state"]
            if (run.state["phase"] == stop_phase and state is not None
                    and state["epoch"] == int(stop_epoch)):
                raise KeyboardInterrupt

        distill.Run.save_state = save_then_stop
    return distill.main(arguments)


def launch(arguments, processes, stop_after=None):
    """Run this file as a worker under torchrun (or directly, for one process)."""
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    environment.pop("STOP_AFTER", None)
    if stop_after:
        environment["STOP_AFTER"] = stop_after
    if processes == 1:
        command = [sys.executable, __file__]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", __file__]
    return subprocess.run(command + [str(argument) for argument in arguments],
                          capture_output=True, text=True, cwd=HERE, env=environment,
                          timeout=600)


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def load_weights(path):
    payload = torch.load(path, weights_only=True)
    return payload.get("state_dict", payload)


class TestTwoProcesses(unittest.TestCase):
    """One single-process run, one two-process run, and one two-process run stopped after the
    first student epoch and resumed twice, with two processes and with one."""

    @classmethod
    def setUpClass(cls):
        from test_data import make_image_folder

        cls.temporary = tempfile.TemporaryDirectory()
        cls.root = Path(cls.temporary.name)
        # 31 test images: the two processes take 16 and 15.
        cls.data_dir = make_image_folder(cls.root / "data", train_per_class=32,
                                         test_per_class=10)
        (cls.data_dir / "test" / "cat" / "extra.png").write_bytes(
            (cls.data_dir / "test" / "cat" / "0000.png").read_bytes())

        cls.single, cls.double = cls.root / "single", cls.root / "double"
        cls.results = {"single": launch(cls.arguments(cls.single), 1),
                       "double": launch(cls.arguments(cls.double), 2)}
        stopped = cls.root / "stopped"
        cls.results["stopped"] = launch(cls.arguments(stopped), 2, stop_after="student:1")
        cls.resumed_double, cls.resumed_single = cls.root / "resumed-2", cls.root / "resumed-1"
        shutil.copytree(stopped, cls.resumed_double)
        shutil.copytree(stopped, cls.resumed_single)
        cls.results["resumed-2"] = launch(["--resume", "--out", cls.resumed_double], 2)
        cls.results["resumed-1"] = launch(["--resume", "--out", cls.resumed_single], 1)

    @classmethod
    def tearDownClass(cls):
        cls.temporary.cleanup()

    @classmethod
    def arguments(cls, out, *extra):
        return ["--data-dir", cls.data_dir, "--out", out, "--teacher", "plaincnn",
                "--student", "plaincnn", "--batch-size", "16", "--teacher-epochs", "1",
                "--epochs", "2", "--amp", "off", "--lr", "0.05", *extra]

    def check_finished(self, name):
        result = self.results[name]
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])

    def test_two_process_run_finishes_and_says_so(self):
        self.check_finished("double")
        self.assertIn("2 processes", self.results["double"].stdout)

    def test_ranks_end_with_identical_weights(self):
        self.check_finished("double")
        for phase in ("teacher", "student"):
            rank0 = load_weights(self.double / f"{phase}-rank0.pt")
            rank1 = load_weights(self.double / f"{phase}-rank1.pt")
            for key in rank0:
                with self.subTest(phase=phase, key=key):
                    self.assertTrue(torch.equal(rank0[key], rank1[key]))

    def test_weights_equal_the_single_process_run(self):
        self.check_finished("single")
        self.check_finished("double")
        for phase in ("teacher", "student"):
            double = load_weights(self.double / f"{phase}.pt")
            single = load_weights(self.single / f"{phase}.pt")
            for key in double:
                with self.subTest(phase=phase, key=key):
                    torch.testing.assert_close(double[key], single[key], **TOLERANCE)

    def test_logged_metrics_equal_the_single_process_run(self):
        self.check_finished("single")
        self.check_finished("double")
        entries, reference = read_metrics(self.double), read_metrics(self.single)
        self.assertEqual(len(entries), 3)
        self.assertEqual(len(entries), len(reference))
        for entry, expected in zip(entries, reference):
            for key in COMPARED_METRICS:
                with self.subTest(phase=entry["phase"], epoch=entry["epoch"], key=key):
                    if expected[key] is None:
                        self.assertIsNone(entry[key])
                    else:
                        self.assertAlmostEqual(entry[key], expected[key], delta=1e-4)

    def test_every_test_image_is_counted_once(self):
        self.check_finished("double")
        for entry in read_metrics(self.double):
            self.assertEqual(entry["test_images"], 31)

    def test_stopped_run_exits_non_zero_keeping_its_checkpoint(self):
        self.assertNotEqual(self.results["stopped"].returncode, 0)
        state = torch.load(self.root / "stopped" / "resume.pt", weights_only=True)
        self.assertEqual((state["phase"], state["phase_state"]["epoch"]), ("student", 1))

    def test_resumed_two_process_run_equals_an_uninterrupted_one(self):
        self.check_finished("double")
        self.check_finished("resumed-2")
        expected = load_weights(self.double / "student.pt")
        resumed = load_weights(self.resumed_double / "student.pt")
        for key in expected:
            self.assertTrue(torch.equal(expected[key], resumed[key]), key)
        timing = ("images_per_second", "seconds")
        self.assertEqual(
            [{k: v for k, v in e.items() if k not in timing} for e in read_metrics(self.double)],
            [{k: v for k, v in e.items() if k not in timing}
             for e in read_metrics(self.resumed_double)],
        )

    def test_two_process_checkpoint_resumes_in_one_process(self):
        self.check_finished("double")
        self.check_finished("resumed-1")
        expected = load_weights(self.double / "student.pt")
        resumed = load_weights(self.resumed_single / "student.pt")
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], **TOLERANCE)

    def test_batch_norm_network_keeps_ranks_identical(self):
        out = self.root / "batchnorm"
        result = launch(self.arguments(out, "--student", "tinycnn", "--epochs", "1"), 2)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        rank0 = load_weights(out / "student-rank0.pt")
        rank1 = load_weights(out / "student-rank1.pt")
        for key in rank0:  # running statistics included
            self.assertTrue(torch.equal(rank0[key], rank1[key]), key)

    def test_batch_that_does_not_split_over_the_processes_is_rejected(self):
        result = launch(self.arguments(self.root / "odd", "--batch-size", "15"), 2)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("does not split evenly over 2 processes", result.stderr)


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
