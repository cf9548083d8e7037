"""Tests of distill.py: tiny end-to-end runs on synthetic images, the training step, resume,
evaluation and bad inputs.

    python -m unittest test_distill -v
"""
import contextlib
import copy
import io
import itertools
import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
import torchvision
from torch import nn

import data
import distill
import loss
import models
from test_data import make_image_folder

CPU = torch.device("cpu")
TIMING_KEYS = ("images_per_second", "seconds")


def run_distill(arguments):
    """distill.main(arguments) in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = distill.main([str(argument) for argument in arguments])
        except SystemExit as exit:  # argparse exits by itself
            status = exit.code
    return status, stdout.getvalue(), stderr.getvalue()


def tiny_run_arguments(data_dir, out, *extra):
    return ["--data-dir", data_dir, "--out", out, "--teacher", "tinycnn", "--student",
            "tinycnn", "--batch-size", "16", "--eval-batch-size", "64", "--lr", "0.05",
            "--teacher-epochs", "1", "--epochs", "2", *extra]


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_timings(entries):
    return [{key: value for key, value in entry.items() if key not in TIMING_KEYS}
            for entry in entries]


def state_dicts_in(payload, prefix=""):
    """Every state dict (dict of tensors) inside a checkpoint, with where it was found."""
    if isinstance(payload, dict):
        if payload and all(torch.is_tensor(value) for value in payload.values()):
            yield prefix, payload
        for key, value in payload.items():
            yield from state_dicts_in(value, f"{prefix}/{key}")


class WithImageFolder(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.temporary = tempfile.TemporaryDirectory()
        cls.root = Path(cls.temporary.name)
        cls.data_dir = make_image_folder(cls.root / "data")

    @classmethod
    def tearDownClass(cls):
        cls.temporary.cleanup()

    def fresh_out(self, name):
        return self.root / f"{self.id().rsplit('.', 1)[-1]}-{name}"


class TestEndToEnd(WithImageFolder):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.out = cls.root / "run"
        cls.status, cls.stdout, cls.stderr = run_distill(
            tiny_run_arguments(cls.data_dir, cls.out, "--baseline", "--teacher-epochs", "2"))

    def test_run_finishes_with_students_above_chance(self):
        self.assertEqual(self.status, 0, self.stderr)
        summary = json.loads((self.out / "summary.json").read_text())
        for phase in ("teacher", "student", "baseline"):
            with self.subTest(phase=phase):
                self.assertGreater(summary["results"][phase]["test_accuracy"], 1 / 3 + 0.1)

    def test_metrics_hold_one_entry_per_epoch_and_phase(self):
        entries = read_metrics(self.out)
        self.assertEqual([(entry["phase"], entry["epoch"]) for entry in entries],
                         [("teacher", 1), ("teacher", 2), ("student", 1), ("student", 2),
                          ("baseline", 1), ("baseline", 2)])
        student = entries[2]
        for key in ("loss", "kd_loss", "ce_loss", "test_accuracy", "agreement", "top5_overlap",
                    "lr", "temperature", "alpha", "images_per_second", "seconds"):
            with self.subTest(key=key):
                self.assertIsInstance(student[key], float)
        self.assertEqual(student["temperature"], loss.step_temperature(0, 2))
        self.assertEqual(student["alpha"], loss.exponential_alpha(0, 2))

    def test_schedules_start_where_the_flags_say(self):
        out = self.fresh_out("run")
        status, _, stderr = run_distill(tiny_run_arguments(
            self.data_dir, out, "--temperature-schedule", "step", "--temperature", "3",
            "--alpha-schedule", "linear", "--alpha", "0.5", "--alpha-end", "0.1"))
        self.assertEqual(status, 0, stderr)
        student = [entry for entry in read_metrics(out) if entry["phase"] == "student"]
        self.assertEqual([entry["temperature"] for entry in student], [3.0, 1.5])
        self.assertEqual(student[0]["alpha"], 0.5)
        self.assertAlmostEqual(student[1]["alpha"], 0.1, places=12)

    def test_reported_result_is_the_last_epochs_not_the_best(self):
        summary = json.loads((self.out / "summary.json").read_text())["results"]
        for phase in ("teacher", "student", "baseline"):
            last = [entry for entry in read_metrics(self.out) if entry["phase"] == phase][-1]
            with self.subTest(phase=phase):
                self.assertEqual(summary[phase]["test_accuracy"], last["test_accuracy"])

    def test_startup_line_and_final_table_are_printed(self):
        self.assertIn("device cpu", self.stdout)
        self.assertIn("teacher tinycnn (0.09 M params)", self.stdout)
        self.assertIn("student alone", self.stdout)
        self.assertIn("KD vs alone", self.stdout)
        self.assertIn("total time", self.stdout)

    def test_checkpoints_load_with_weights_only_and_carry_no_wrapper_prefixes(self):
        files = sorted(path.name for path in self.out.glob("*.pt"))
        self.assertEqual(files, ["baseline.pt", "resume.pt", "student.pt", "teacher.pt"])
        for name in files:
            payload = torch.load(self.out / name, weights_only=True)
            for where, state_dict in state_dicts_in(payload):
                with self.subTest(file=name, where=where):
                    self.assertFalse([key for key in state_dict
                                      if key.startswith(("module.", "_orig_mod."))])

    def test_student_checkpoint_rebuilds_the_model(self):
        payload = torch.load(self.out / "student.pt", weights_only=True)
        model = models.build_model(payload["architecture"], payload["num_classes"])
        model.load_state_dict(payload["state_dict"])
        self.assertEqual(payload["classes"], ["ant", "bee", "cat"])

    def test_configuration_is_saved(self):
        config = json.loads((self.out / "config.json").read_text())
        self.assertEqual(config["student"], "tinycnn")
        self.assertEqual(config["teacher_epochs"], 2)


class TestOutputOnATerminal(WithImageFolder):
    def test_progress_line_during_the_epoch_and_summary_line_over_it(self):
        class Terminal(io.StringIO):
            def isatty(self):
                return True

        terminal = Terminal()
        with mock.patch.object(sys, "stdout", terminal), mock.patch.object(
                distill.time, "perf_counter", side_effect=itertools.count(0.0, 0.6)):
            status = distill.main([str(a) for a in tiny_run_arguments(
                self.data_dir, self.fresh_out("run"))])
        self.assertEqual(status, 0)
        output = terminal.getvalue()
        self.assertRegex(output, r"\rstudent  epoch   1/2  step \d+/7  loss \d+\.\d{4}  \d+ img/s")
        self.assertIn("\r\x1b[Kstudent  epoch   1/2  loss", output)


class TestScript(WithImageFolder):
    def test_script_runs_end_to_end_from_the_command_line(self):
        out = self.fresh_out("run")
        result = subprocess.run(
            [sys.executable, "distill.py", *tiny_run_arguments(self.data_dir, out)],
            capture_output=True, text=True, cwd=Path(__file__).parent, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("student with KD", result.stdout)

    def test_help_gives_defaults_without_none(self):
        result = subprocess.run([sys.executable, "distill.py", "--help"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, timeout=120)
        self.assertEqual(result.returncode, 0)
        self.assertIn("(default: 30)", result.stdout)
        self.assertNotIn("None", result.stdout)

    def test_bad_value_from_the_command_line_is_one_line_and_status_2(self):
        result = subprocess.run([sys.executable, "distill.py", "--epochs", "0"],
                                capture_output=True, text=True, cwd=Path(__file__).parent,
                                timeout=120)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("--epochs", result.stderr)


class TestPhases(WithImageFolder):
    def test_teacher_is_bit_identical_after_distillation_steps(self):
        snapshots = []
        original = distill.train_epoch

        def spy(model, teacher, *rest, **keywords):
            if teacher is not None:
                before = copy.deepcopy(teacher.state_dict())
                result = original(model, teacher, *rest, **keywords)
                snapshots.append((before, copy.deepcopy(teacher.state_dict())))
                return result
            return original(model, teacher, *rest, **keywords)

        with mock.patch.object(distill, "train_epoch", spy):
            status, _, stderr = run_distill(tiny_run_arguments(self.data_dir,
                                                                self.fresh_out("run")))
        self.assertEqual(status, 0, stderr)
        self.assertEqual(len(snapshots), 2)
        for before, after in snapshots:
            self.assertEqual(before.keys(), after.keys())
            for key in before:  # parameters and buffers (batch-norm statistics) alike
                self.assertTrue(torch.equal(before[key], after[key]), key)

    def test_optimizer_holds_exactly_the_trained_models_parameters(self):
        checked = []
        original = distill.train_epoch

        def spy(model, teacher, criterion, optimizer, *rest, **keywords):
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            checked.append(teacher is not None)
            self.assertEqual(in_optimizer, {id(p) for p in model.parameters()})
            if teacher is not None:
                self.assertFalse(in_optimizer & {id(p) for p in teacher.parameters()})
                self.assertFalse(any(p.requires_grad for p in teacher.parameters()))
            return original(model, teacher, criterion, optimizer, *rest, **keywords)

        with mock.patch.object(distill, "train_epoch", spy):
            status, _, stderr = run_distill(tiny_run_arguments(
                self.data_dir, self.fresh_out("run"), "--baseline"))
        self.assertEqual(status, 0, stderr)
        self.assertEqual(checked, [False, True, True, False, False])

    def test_baseline_is_paired_with_the_student(self):
        # With alpha = 0 distillation is plain cross-entropy, so a student and a baseline that
        # start from the same weights and see the same batches must end up the same.
        out = self.fresh_out("run")
        status, _, stderr = run_distill(tiny_run_arguments(
            self.data_dir, out, "--baseline", "--alpha", "0", "--amp", "off"))
        self.assertEqual(status, 0, stderr)
        student = torch.load(out / "student.pt", weights_only=True)["state_dict"]
        baseline = torch.load(out / "baseline.pt", weights_only=True)["state_dict"]
        for key in student:
            torch.testing.assert_close(student[key], baseline[key], rtol=1e-4, atol=1e-5)

    def test_teacher_of_the_students_architecture_is_not_the_baseline(self):
        # The baseline shares the student's seed; the teacher must not, or with one
        # architecture for both, "student alone" would be the teacher again.
        out = self.fresh_out("run")
        status, _, stderr = run_distill(tiny_run_arguments(
            self.data_dir, out, "--baseline", "--teacher-epochs", "2"))
        self.assertEqual(status, 0, stderr)
        teacher = torch.load(out / "teacher.pt", weights_only=True)["state_dict"]
        baseline = torch.load(out / "baseline.pt", weights_only=True)["state_dict"]
        self.assertFalse(torch.equal(teacher["features.0.weight"],
                                     baseline["features.0.weight"]))

    def test_teacher_checkpoint_is_loaded_instead_of_training(self):
        first = self.fresh_out("first")
        status, _, stderr = run_distill(tiny_run_arguments(self.data_dir, first))
        self.assertEqual(status, 0, stderr)
        second = self.fresh_out("second")
        status, stdout, stderr = run_distill(tiny_run_arguments(
            self.data_dir, second, "--teacher-checkpoint", first / "teacher.pt"))
        self.assertEqual(status, 0, stderr)
        self.assertNotIn("teacher  epoch", stdout)
        self.assertEqual([entry["phase"] for entry in read_metrics(second)],
                         ["student", "student"])
        saved = json.loads((first / "summary.json").read_text())["results"]["teacher"]
        self.assertIn(f"test top-1 {100 * saved['test_accuracy']:.2f}%", stdout)


class TestResume(WithImageFolder):
    def interrupt_after(self, phase, epoch):
        """A patch that stops the run like Ctrl-C once `phase` has saved `epoch`."""
        original = distill.Run.save_state

        def save_then_stop(run, *arguments):
            original(run, *arguments)
            state = run.state["phase_state"]
            if run.state["phase"] == phase and state is not None and state["epoch"] == epoch:
                raise KeyboardInterrupt

        return mock.patch.object(distill.Run, "save_state", save_then_stop)

    def check_resume_equals_straight_run(self, phase, epoch, *extra):
        straight = self.fresh_out("straight")
        status, _, stderr = run_distill(tiny_run_arguments(self.data_dir, straight, *extra))
        self.assertEqual(status, 0, stderr)

        stopped = self.fresh_out("stopped")
        with self.interrupt_after(phase, epoch):
            status, _, stderr = run_distill(tiny_run_arguments(self.data_dir, stopped, *extra))
        self.assertEqual(status, 130)
        self.assertIn(f"--resume --out {stopped}", stderr)
        status, _, stderr = run_distill(["--resume", "--out", stopped])
        self.assertEqual(status, 0, stderr)

        for name in ("teacher.pt", "student.pt"):
            expected = torch.load(straight / name, weights_only=True)["state_dict"]
            resumed = torch.load(stopped / name, weights_only=True)["state_dict"]
            for key in expected:
                with self.subTest(file=name, key=key):
                    self.assertTrue(torch.equal(expected[key], resumed[key]))
        self.assertEqual(without_timings(read_metrics(stopped)),
                         without_timings(read_metrics(straight)))

    def test_student_phase_resumed_after_one_epoch_equals_a_straight_run(self):
        self.check_resume_equals_straight_run("student", 1)

    def test_teacher_phase_resumed_after_one_epoch_equals_a_straight_run(self):
        # --amp off also checks that the resumed run takes its precision from the saved run.
        self.check_resume_equals_straight_run("teacher", 1, "--teacher-epochs", "2",
                                              "--amp", "off")

    def test_resume_uses_the_saved_configuration(self):
        out = self.fresh_out("run")
        with self.interrupt_after("student", 1):
            run_distill(tiny_run_arguments(self.data_dir, out))
        status, stdout, stderr = run_distill(["--resume", "--out", out, "--epochs", "5"])
        self.assertEqual(status, 0, stderr)
        self.assertIn("ignoring --epochs", stdout)
        self.assertEqual(read_metrics(out)[-1]["epochs"], 2)

    def test_resuming_a_finished_run_prints_its_table(self):
        out = self.fresh_out("run")
        run_distill(tiny_run_arguments(self.data_dir, out))
        status, stdout, stderr = run_distill(["--resume", "--out", out])
        self.assertEqual(status, 0, stderr)
        self.assertIn("holds a finished run", stdout)
        self.assertIn("student with KD", stdout)

    def test_run_stopped_in_its_first_epoch_can_be_resumed(self):
        out = self.fresh_out("run")
        original = distill.train_epoch
        with mock.patch.object(distill, "train_epoch", side_effect=KeyboardInterrupt):
            status, _, stderr = run_distill(tiny_run_arguments(self.data_dir, out))
        self.assertEqual(status, 130)
        self.assertIn(f"--resume --out {out}", stderr)
        self.assertIs(distill.train_epoch, original)
        status, _, stderr = run_distill(["--resume", "--out", out])
        self.assertEqual(status, 0, stderr)
        self.assertEqual(len(read_metrics(out)), 3)

    def test_flags_given_with_resume_are_reported_even_when_they_equal_a_default(self):
        out = self.fresh_out("run")
        with self.interrupt_after("student", 1):
            run_distill(tiny_run_arguments(self.data_dir, out))
        status, stdout, _ = run_distill(["--resume", "--out", out, "--epochs", "30",
                                         "--student", "resnet20"])
        self.assertEqual(status, 0)
        self.assertIn("ignoring --student, --epochs", stdout)

    def test_resume_on_another_device_or_precision_is_refused(self):
        out = self.fresh_out("run")
        with self.interrupt_after("student", 1):
            run_distill(tiny_run_arguments(self.data_dir, out))
        state = torch.load(out / "resume.pt", weights_only=True)
        state["hardware"] = {"device_type": "cuda", "precision": "bf16"}
        torch.save(state, out / "resume.pt")
        status, _, stderr = run_distill(["--resume", "--out", out])
        self.assertEqual(status, 2)
        self.assertIn("started on cuda in bf16; it continues only there", stderr)

    def test_resume_on_other_data_is_refused(self):
        out = self.fresh_out("run")
        with self.interrupt_after("student", 1):
            run_distill(tiny_run_arguments(self.data_dir, out))
        other = make_image_folder(self.fresh_out("other-data"), classes=("x", "y"))
        status, _, stderr = run_distill(["--resume", "--out", out, "--data-dir", other])
        self.assertEqual(status, 2)
        self.assertIn("holds other data than this run was started with", stderr)

    def test_existing_run_is_not_overwritten_without_resume(self):
        out = self.fresh_out("run")
        with self.interrupt_after("student", 1):
            run_distill(tiny_run_arguments(self.data_dir, out))
        before = (out / "resume.pt").read_bytes()
        status, _, stderr = run_distill(tiny_run_arguments(self.data_dir, out))
        self.assertEqual(status, 2)
        self.assertIn("--resume", stderr)
        self.assertEqual((out / "resume.pt").read_bytes(), before)


class TestNonFiniteLoss(WithImageFolder):
    def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_last_checkpoint(self):
        calls = []
        original = loss.distillation_loss

        def poisoned(*arguments, **keywords):
            parts = original(*arguments, **keywords)
            calls.append(1)
            if len(calls) == 7 + 3:  # epoch 2 (7 steps per epoch), step 3
                return parts._replace(total=parts.total * float("nan"))
            return parts

        out = self.fresh_out("run")
        with mock.patch.object(loss, "distillation_loss", poisoned):
            status, _, stderr = run_distill(tiny_run_arguments(self.data_dir, out))
        self.assertEqual(status, 1)
        self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)
        self.assertIn("epoch 2, step 3 of 7", stderr)
        state = torch.load(out / "resume.pt", weights_only=True)
        self.assertEqual((state["phase"], state["phase_state"]["epoch"]), ("student", 1))
        self.assertTrue(all(torch.isfinite(value).all()
                            for value in state["phase_state"]["model"].values()
                            if value.is_floating_point()))


def batch_of(seed=0, size=16, num_classes=3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    return images.contiguous(memory_format=torch.channels_last), torch.randint(
        num_classes, (size,), generator=generator)


def runtime_with(amp):
    args = distill.parse_args(["--device", "cpu", "--amp", amp])
    return distill.Runtime(args)


def models_pair(num_classes=3):
    torch.manual_seed(0)
    teacher = models.build_model("tinycnn", num_classes).to(memory_format=torch.channels_last)
    student = models.build_model("tinycnn", num_classes).to(memory_format=torch.channels_last)
    teacher.eval().requires_grad_(False)
    return teacher, student


def one_step(student, teacher, runtime, images, labels, scaler=None, steps=1):
    """`steps` training steps on the same batch, through distill.train_epoch."""
    optimizer = distill.make_optimizer(student, 0.1, 5e-4, CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return distill.train_epoch(
        student, teacher, loss.KLDivLossWithTemperature(4.0, 0.7), optimizer, scheduler,
        scaler or runtime.make_scaler(), [(images, labels)] * steps, steps, runtime)


class TestStep(unittest.TestCase):
    def test_step_without_amp_equals_a_plain_float32_step_exactly(self):
        teacher, student = models_pair()
        reference = copy.deepcopy(student)
        images, labels = batch_of()
        one_step(student, teacher, runtime_with("off"), images, labels)

        optimizer = distill.make_optimizer(reference, 0.1, 5e-4, CPU)
        with torch.no_grad():
            teacher_logits = teacher(images)
        total = loss.KLDivLossWithTemperature(4.0, 0.7)(reference(images), teacher_logits, labels)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        for (name, got), want in zip(student.state_dict().items(),
                                     reference.state_dict().values()):
            self.assertTrue(torch.equal(got, want), name)

    def test_bf16_step_gives_the_float32_loss_within_bf16_tolerance(self):
        images, labels = batch_of()
        results = {}
        for amp in ("off", "bf16"):
            teacher, student = models_pair()
            results[amp] = one_step(student, teacher, runtime_with(amp), images, labels)
        for key in ("loss", "kd_loss", "ce_loss"):
            with self.subTest(key=key):
                # bf16 keeps 8 bits of mantissa: about 0.4% per rounding.
                self.assertAlmostEqual(results["bf16"][key], results["off"][key],
                                       delta=0.03 * abs(results["off"][key]))

    def test_fp16_steps_skipped_by_the_scaler_are_counted(self):
        teacher, student = models_pair()
        before = copy.deepcopy(student.state_dict())
        # A scale this large overflows float16 gradients, so the scaler skips the first step;
        # the backoff then brings the scale down to 1 and the second step goes through.
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100, backoff_factor=2.0 ** -100)
        result = one_step(student, teacher, runtime_with("fp16"), *batch_of(), scaler=scaler,
                          steps=2)
        self.assertEqual(result["skipped_steps"], 1)
        changed = [key for key, value in student.state_dict().items()
                   if value.is_floating_point() and not torch.equal(value, before[key])]
        self.assertTrue(changed)

    def test_epoch_of_only_skipped_fp16_steps_is_divergence(self):
        teacher, student = models_pair()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
        with self.assertRaisesRegex(distill.TrainingDiverged, "every one of its 2 fp16 steps"):
            one_step(student, teacher, runtime_with("fp16"), *batch_of(), scaler=scaler,
                     steps=2)

    def test_loss_parts_are_averaged_over_images(self):
        teacher, student = models_pair()
        images, labels = batch_of()
        criterion = loss.KLDivLossWithTemperature(4.0, 0.7)
        with torch.no_grad():
            want = criterion.parts(copy.deepcopy(student).train()(images), teacher(images),
                                   labels)
        result = one_step(student, teacher, runtime_with("off"), images, labels)
        self.assertAlmostEqual(result["loss"], want.total.item(), places=5)
        self.assertAlmostEqual(result["kd_loss"], want.distillation.item(), places=5)


class FixedPredictions(nn.Module):
    """Returns, for image i, the logits row i of a table; image i holds the value i."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, images):
        return self.table[images[:, 0, 0, 0].round().long()]


def split_of_indices(labels):
    count = len(labels)
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 2, 2)
    return data.Split(images.contiguous(), torch.tensor(labels))


class TestEvaluate(unittest.TestCase):
    def setUp(self):
        identity = data.Normalize((0.0,) * 3, (1 / 255,) * 3, CPU)  # keeps pixel values
        # Batches of 4: [0 0 0 0] all right, [1 1 1 1] all wrong, [0 0] right: 6 of 10 right,
        # where averaging per-batch accuracies would give (1 + 0 + 1) / 3.
        labels = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
        self.image_data = data.ImageData(split_of_indices(labels), split_of_indices(labels),
                                         ["a", "b"], identity, "test")
        self.runtime = runtime_with("off")

    def test_top1_is_counted_over_samples_not_averaged_over_batches(self):
        model = FixedPredictions(torch.tensor([[1.0, 0.0]] * 10))
        result = distill.evaluate(model, self.image_data, self.runtime, batch_size=4)
        self.assertEqual(result["test_accuracy"], 0.6)

    def test_agreement_and_top_k_overlap_with_the_teacher(self):
        student = FixedPredictions(torch.eye(6)[[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]] * 5
                                   + torch.arange(6.0) / 10)
        teacher_top = torch.tensor([[0, 5, 4, 3, 2]] * 10)
        result = distill.evaluate(student, self.image_data, self.runtime, 4, teacher_top)
        student_top = distill.predict_test_split(student, self.image_data, self.runtime, 4)[1]
        self.assertEqual(result["agreement"], 2 / 10)  # images 0 and 6 predict class 0
        overlap = [len(set(row.tolist()) & {0, 5, 4, 3, 2}) / 5 for row in student_top]
        self.assertAlmostEqual(result["top5_overlap"], sum(overlap) / 10, places=12)

    def test_model_is_back_in_train_mode_after_evaluation(self):
        model = FixedPredictions(torch.zeros(10, 2)).train()
        distill.evaluate(model, self.image_data, self.runtime, 4)
        self.assertTrue(model.training)


class TestCheckpointFormat(unittest.TestCase):
    def test_wrapper_prefixes_are_removed(self):
        model = models.build_model("tinycnn", 3)
        compiled = torch.compile(model)  # compiles lazily: building it is cheap
        self.assertTrue(any(key.startswith("_orig_mod.") for key in compiled.state_dict()))
        cleaned = distill.plain_state_dict(compiled.state_dict())
        self.assertEqual(list(cleaned), list(model.state_dict()))
        wrapped = {"module." + key: value for key, value in model.state_dict().items()}
        self.assertEqual(list(distill.plain_state_dict(wrapped)), list(model.state_dict()))

    def test_interrupted_write_leaves_the_previous_checkpoint(self):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "resume.pt"
            distill.save_atomic({"epoch": 1}, path)
            with mock.patch.object(torch, "save", side_effect=OSError("disk full")):
                with self.assertRaises(OSError):
                    distill.save_atomic({"epoch": 2}, path)
            self.assertEqual(torch.load(path, weights_only=True), {"epoch": 1})


class TestBadInputs(WithImageFolder):
    def check_one_line_error(self, arguments, status, *fragments):
        got, _, stderr = run_distill(arguments)
        self.assertEqual(got, status, stderr)
        self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)
        self.assertNotIn("Traceback", stderr)
        for fragment in fragments:
            self.assertIn(fragment, stderr)

    def test_non_positive_numbers_are_rejected(self):
        for flag, value in (("--epochs", "0"), ("--epochs", "-3"), ("--batch-size", "0"),
                            ("--teacher-epochs", "-1"), ("--temperature", "0"),
                            ("--temperature", "-2"), ("--temperature", "nan"), ("--lr", "0")):
            with self.subTest(flag=flag, value=value):
                self.check_one_line_error([flag, value], 2, flag, value)

    def test_alpha_outside_zero_to_one_is_rejected(self):
        for value in ("1.5", "-0.1", "nan"):
            with self.subTest(value=value):
                self.check_one_line_error(["--alpha", value], 2, "--alpha", value)

    def test_unknown_model_is_rejected_with_the_choices(self):
        self.check_one_line_error(["--student", "resnet99"], 2, "resnet99", "tinycnn")
        self.check_one_line_error(["--teacher", "vgg"], 2, "vgg")

    def test_file_that_is_not_a_checkpoint_is_rejected(self):
        junk = self.root / "junk.pt"
        junk.write_text("hello")
        self.check_one_line_error(
            tiny_run_arguments(self.data_dir, self.fresh_out("run"), "--teacher-checkpoint",
                               junk), 1, "junk.pt", "not a readable PyTorch checkpoint")

    def test_missing_checkpoint_is_rejected(self):
        self.check_one_line_error(
            tiny_run_arguments(self.data_dir, self.fresh_out("run"), "--teacher-checkpoint",
                               self.root / "missing.pt"), 1, "missing.pt: no such file")

    def test_teacher_checkpoint_of_another_architecture_is_rejected(self):
        path = self.root / "resnet20-teacher.pt"
        torch.save({"architecture": "resnet20", "num_classes": 3,
                    "state_dict": models.build_model("resnet20", 3).state_dict()}, path)
        self.check_one_line_error(
            tiny_run_arguments(self.data_dir, self.fresh_out("run"), "--teacher-checkpoint",
                               path), 1, "resnet20 teacher", "pass --teacher resnet20")

    def test_teacher_checkpoint_for_another_class_count_is_rejected_leaving_no_folder(self):
        path = self.root / "ten-class-teacher.pt"
        torch.save(models.build_model("tinycnn", 10).state_dict(), path)
        out = self.fresh_out("run")
        self.check_one_line_error(
            tiny_run_arguments(self.data_dir, out, "--teacher-checkpoint", path), 1,
            "does not fit a tinycnn with 3 classes")
        self.assertFalse(out.exists())

    def test_end_value_for_a_schedule_without_one_is_rejected(self):
        self.check_one_line_error(["--temperature-end", "2"], 2,
                                  "--temperature-end is for the linear and cosine schedules")
        self.check_one_line_error(["--alpha-schedule", "constant", "--alpha-end", "0.2"], 2,
                                  "--alpha-end")

    def test_output_folder_that_cannot_be_written_is_rejected(self):
        blocker = self.root / "a-file"
        blocker.write_text("")
        self.check_one_line_error(
            tiny_run_arguments(self.data_dir, blocker / "run"), 2, "cannot write to --out")

    def test_missing_data_is_one_line_naming_what_was_looked_for(self):
        refuse = mock.MagicMock(side_effect=OSError("no network"))
        with mock.patch.object(torchvision.datasets, "CIFAR10", refuse):
            self.check_one_line_error(
                tiny_run_arguments(self.root / "no-data", self.fresh_out("run")), 1,
                "cifar-10-batches-py", "--data-dir")

    def test_batch_larger_than_the_training_set_is_rejected(self):
        self.check_one_line_error(
            tiny_run_arguments(self.data_dir, self.fresh_out("run"), "--batch-size", "500"),
            2, "--batch-size 500")

    def test_tensorboard_without_the_package_is_one_clear_line(self):
        with mock.patch.dict(sys.modules, {"torch.utils.tensorboard": None}):
            self.check_one_line_error(
                tiny_run_arguments(self.data_dir, self.fresh_out("run"), "--tensorboard"), 2,
                "pip install tensorboard")

    def test_output_folder_holding_other_files_is_refused_and_left_alone(self):
        out = self.fresh_out("mine")
        out.mkdir()
        (out / "config.json").write_text("my own file")
        self.check_one_line_error(tiny_run_arguments(self.data_dir, out), 2, "not an empty")
        self.assertEqual((out / "config.json").read_text(), "my own file")

    def test_run_that_fails_before_training_leaves_no_folder(self):
        out = self.fresh_out("run")
        self.check_one_line_error(
            tiny_run_arguments(self.data_dir, out, "--subset", "1000"), 2, "--subset 1000")
        self.assertFalse(out.exists())

    def test_folder_given_as_checkpoint_is_named_as_such(self):
        self.check_one_line_error(
            tiny_run_arguments(self.data_dir, self.fresh_out("run"), "--teacher-checkpoint",
                               self.root), 1, "is a folder, not a checkpoint file")

    def test_word_for_a_number_is_rejected_naming_the_flag(self):
        self.check_one_line_error(["--epochs", "abc"], 2,
                                  "--epochs: must be a positive integer, got 'abc'")

    def test_resume_without_a_run_is_rejected(self):
        self.check_one_line_error(["--resume", "--out", self.root / "nothing"], 1,
                                  "resume.pt: no such file")


if __name__ == "__main__":
    unittest.main()
