"""Tests of loss.py against a float64 reference written from the definition.

    python -m unittest test_loss -v

Every test runs with warnings turned into errors, so the loss must not warn.
"""
import math
import unittest
import warnings

import torch
import torch.nn.functional as F

from loss import (
    KLDivLossWithTemperature,
    constant,
    cosine,
    exponential_alpha,
    linear,
    step_temperature,
)

EPOCH_COUNTS = (1, 2, 3, 4, 9, 10, 30)
FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def softmax64(logits):
    """softmax over the last dimension in float64, straight from exp(x_i) / sum_j exp(x_j)."""
    logits = logits.double()
    exps = (logits - logits.max(dim=-1, keepdim=True).values).exp()
    return exps / exps.sum(dim=-1, keepdim=True)


def reference_loss(student, teacher, labels, temperature, alpha):
    """alpha * T^2 * mean_n sum_c p_t log(p_t / p_s) + (1 - alpha) * mean_n -log softmax(s)[y_n].

    Python floats from float64 probabilities; labels a list, -100 for a left-out sample.
    """
    T = temperature
    p_teacher = softmax64(teacher.double() / T).tolist()
    p_student = softmax64(student.double() / T).tolist()
    kl_rows = [
        sum(pt * math.log(pt / ps) for pt, ps in zip(row_teacher, row_student) if pt > 0)
        for row_teacher, row_student in zip(p_teacher, p_student)
    ]
    distillation = T * T * sum(kl_rows) / len(kl_rows)
    if labels is None:
        return distillation
    p_hard = softmax64(student).tolist()
    labels = labels.tolist() if torch.is_tensor(labels) else labels
    kept = [n for n, label in enumerate(labels) if label != -100]
    cross_entropy = sum(-math.log(p_hard[n][labels[n]]) for n in kept) / max(len(kept), 1)
    return alpha * distillation + (1 - alpha) * cross_entropy


def random_batch(batch_size=8, num_classes=10, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch_size, num_classes, generator=generator) * scale
    teacher = torch.randn(batch_size, num_classes, generator=generator) * scale
    labels = torch.randint(num_classes, (batch_size,), generator=generator)
    return student, teacher, labels


class WarningsAsErrors(unittest.TestCase):
    def setUp(self):
        caught = warnings.catch_warnings()
        caught.__enter__()
        self.addCleanup(caught.__exit__, None, None, None)
        warnings.simplefilter("error")


class TestValue(WarningsAsErrors):
    def test_matches_reference_for_several_temperatures_and_alphas(self):
        student, teacher, labels = random_batch()
        for temperature in (0.5, 1.0, 4.0, 20.0):
            for alpha in (0.0, 0.3, 0.7, 1.0):
                with self.subTest(temperature=temperature, alpha=alpha):
                    criterion = KLDivLossWithTemperature(temperature, alpha)
                    got = criterion(student, teacher, labels)
                    want = reference_loss(student, teacher, labels, temperature, alpha)
                    self.assertAlmostEqual(got.item(), want, delta=1e-5 * abs(want) + 1e-6)

    def test_float64_inputs_match_reference_to_float64_precision(self):
        student, teacher, labels = random_batch()
        got = KLDivLossWithTemperature(3.0, 0.6)(student.double(), teacher.double(), labels)
        want = reference_loss(student, teacher, labels, 3.0, 0.6)
        self.assertEqual(got.dtype, torch.float64)
        self.assertAlmostEqual(got.item(), want, places=12)

    def test_kl_is_zero_when_student_equals_teacher(self):
        _, teacher, labels = random_batch()
        parts = KLDivLossWithTemperature(4.0, 0.5).parts(teacher.clone(), teacher, labels)
        self.assertLess(abs(parts.distillation.item()), 1e-6)

    def test_alpha_zero_is_plain_cross_entropy(self):
        student, teacher, labels = random_batch()
        got = KLDivLossWithTemperature(4.0, alpha=0.0)(student, teacher, labels)
        torch.testing.assert_close(got, F.cross_entropy(student, labels))

    def test_alpha_one_is_the_pure_distillation_term(self):
        student, teacher, labels = random_batch()
        got = KLDivLossWithTemperature(4.0, alpha=1.0)(student, teacher, labels)
        want = reference_loss(student, teacher, None, 4.0, 1.0)
        self.assertAlmostEqual(got.item(), want, delta=1e-5 * want)

    def test_parts_add_up_to_the_total(self):
        student, teacher, labels = random_batch()
        criterion = KLDivLossWithTemperature(4.0, 0.7)
        parts = criterion.parts(student, teacher, labels)
        torch.testing.assert_close(
            parts.total, 0.7 * parts.distillation + 0.3 * parts.cross_entropy
        )
        torch.testing.assert_close(criterion(student, teacher, labels), parts.total)
        torch.testing.assert_close(parts.cross_entropy, F.cross_entropy(student, labels))

    def test_adding_a_constant_to_a_row_changes_nothing(self):
        student, teacher, labels = random_batch()
        shift = torch.arange(8.0).unsqueeze(1) * 7.0 - 20.0  # a different constant per row
        criterion = KLDivLossWithTemperature(4.0, 0.7)
        base = criterion(student, teacher, labels)
        torch.testing.assert_close(criterion(student + shift, teacher, labels), base)
        torch.testing.assert_close(criterion(student, teacher - shift, labels), base)

    def test_repeating_the_batch_changes_nothing(self):
        student, teacher, labels = random_batch()
        criterion = KLDivLossWithTemperature(4.0, 0.7)
        repeated = criterion(student.repeat(3, 1), teacher.repeat(3, 1), labels.repeat(3))
        torch.testing.assert_close(repeated, criterion(student, teacher, labels))

    def test_kl_is_summed_over_classes_not_averaged(self):
        # The common mistake, reduction="mean", would give exactly 1/C of this.
        student, teacher, _ = random_batch(num_classes=10)
        got = KLDivLossWithTemperature(1.0, 1.0)(student, teacher)
        kl_per_row = (softmax64(teacher) * (softmax64(teacher) / softmax64(student)).log()).sum(1)
        self.assertAlmostEqual(got.item(), kl_per_row.mean().item(), places=5)


class TestGradient(WarningsAsErrors):
    def test_gradient_matches_closed_form_for_alpha_one(self):
        student, teacher, _ = random_batch(batch_size=6)
        for temperature in (1.0, 3.0, 10.0):
            with self.subTest(temperature=temperature):
                student_leaf = student.double().requires_grad_()
                criterion = KLDivLossWithTemperature(temperature, 1.0)
                criterion(student_leaf, teacher.double()).backward()
                want = temperature * (
                    softmax64(student.double() / temperature)
                    - softmax64(teacher.double() / temperature)
                ) / student.shape[0]
                torch.testing.assert_close(student_leaf.grad, want, rtol=1e-10, atol=1e-12)

    def test_gradient_keeps_its_size_as_temperature_grows(self):
        student, teacher, _ = random_batch(scale=1.0)
        norms = {}
        for temperature in (10.0, 100.0, 1000.0):
            student_leaf = student.double().requires_grad_()
            KLDivLossWithTemperature(temperature, 1.0)(student_leaf, teacher.double()).backward()
            norms[temperature] = student_leaf.grad.norm().item()
        # Without T^2 the norm would fall 100x from T=10 to T=1000; with it, it converges to the
        # norm of the centred logit difference / (C * N).
        difference = student.double() - teacher.double()
        limit = (difference - difference.mean(1, keepdim=True)).norm().item() / (10 * 8)
        for temperature, norm in norms.items():
            with self.subTest(temperature=temperature):
                self.assertAlmostEqual(norm / limit, 1.0, delta=0.05)

    def test_teacher_receives_no_gradient(self):
        student, teacher, labels = random_batch()
        student.requires_grad_()
        teacher.requires_grad_()
        KLDivLossWithTemperature(4.0, 0.7)(student, teacher, labels).backward()
        self.assertIsNone(teacher.grad)
        self.assertIsNotNone(student.grad)


class TestPrecision(WarningsAsErrors):
    def test_half_precision_logits_give_float32_matching_float32_on_same_values(self):
        student, teacher, labels = random_batch()
        criterion = KLDivLossWithTemperature(4.0, 0.7)
        for dtype in (torch.float16, torch.bfloat16):
            with self.subTest(dtype=dtype):
                low_student, low_teacher = student.to(dtype), teacher.to(dtype)
                got = criterion(low_student, low_teacher, labels)
                want = criterion(low_student.float(), low_teacher.float(), labels)
                self.assertEqual(got.dtype, torch.float32)
                torch.testing.assert_close(got, want, rtol=0, atol=0)

    def test_inside_autocast_result_is_float32_and_matches(self):
        student, teacher, labels = random_batch()
        criterion = KLDivLossWithTemperature(4.0, 0.7)
        want = criterion(student.bfloat16().float(), teacher.bfloat16().float(), labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = criterion(student.bfloat16(), teacher.bfloat16(), labels)
        self.assertEqual(got.dtype, torch.float32)
        torch.testing.assert_close(got, want, **FLOAT32_TOLERANCE)

    def test_large_half_precision_logits_stay_finite(self):
        student, teacher, labels = random_batch(scale=5e3)  # exp of these overflows in fp16
        for dtype in (torch.float16, torch.bfloat16):
            with self.subTest(dtype=dtype):
                got = KLDivLossWithTemperature(1.0, 0.7)(
                    student.to(dtype), teacher.to(dtype), labels
                )
                self.assertTrue(torch.isfinite(got).item())


class TestMaskingAndLabels(WarningsAsErrors):
    def test_class_masked_by_both_models_contributes_nothing(self):
        student, teacher, labels = random_batch()
        labels = labels.clamp(max=8)  # class 9 is masked, so no label may point at it
        masked_student, masked_teacher = student.clone(), teacher.clone()
        masked_student[:, 9] = float("-inf")
        masked_teacher[:, 9] = float("-inf")
        masked_student.requires_grad_()
        criterion = KLDivLossWithTemperature(4.0, 0.7)
        got = criterion(masked_student, masked_teacher, labels)
        got.backward()
        torch.testing.assert_close(got, criterion(student[:, :9], teacher[:, :9], labels))
        self.assertTrue(torch.isfinite(masked_student.grad).all().item())

    def test_ignored_labels_are_left_out_of_cross_entropy(self):
        student, teacher, labels = random_batch()
        ignored = labels.clone()
        ignored[::2] = -100
        parts = KLDivLossWithTemperature(4.0, 0.7).parts(student, teacher, ignored)
        want = reference_loss(student, teacher, ignored.tolist(), 4.0, 0.0)
        self.assertAlmostEqual(parts.cross_entropy.item(), want, places=5)

    def test_batch_with_every_label_ignored_gives_zero_cross_entropy(self):
        student, teacher, labels = random_batch()
        parts = KLDivLossWithTemperature(4.0, 0.7).parts(
            student, teacher, torch.full_like(labels, -100)
        )
        self.assertEqual(parts.cross_entropy.item(), 0.0)
        self.assertTrue(torch.isfinite(parts.total).item())
        torch.testing.assert_close(parts.total, 0.7 * parts.distillation)

    def test_no_labels_means_pure_distillation(self):
        student, teacher, _ = random_batch()
        parts = KLDivLossWithTemperature(4.0, 0.7).parts(student, teacher, None)
        want = reference_loss(student, teacher, None, 4.0, 1.0)
        self.assertAlmostEqual(parts.total.item(), want, delta=1e-5 * want)
        self.assertEqual(parts.cross_entropy.item(), 0.0)


class TestShapes(WarningsAsErrors):
    def test_sequence_logits_equal_the_flattened_batch(self):
        generator = torch.Generator().manual_seed(1)
        student = torch.randn(4, 5, 10, generator=generator)
        teacher = torch.randn(4, 5, 10, generator=generator)
        labels = torch.randint(10, (4, 5), generator=generator)
        criterion = KLDivLossWithTemperature(4.0, 0.7)
        got = criterion(student, teacher, labels)
        want = reference_loss(student.reshape(20, 10), teacher.reshape(20, 10),
                              labels.reshape(20).tolist(), 4.0, 0.7)
        self.assertAlmostEqual(got.item(), want, delta=1e-5 * want)

    def test_loss_does_not_grow_with_sequence_length(self):
        student, teacher, labels = random_batch()
        criterion = KLDivLossWithTemperature(4.0, 0.7)
        short = criterion(student.unsqueeze(1), teacher.unsqueeze(1), labels.unsqueeze(1))
        long = criterion(
            student.unsqueeze(1).expand(8, 16, 10),
            teacher.unsqueeze(1).expand(8, 16, 10),
            labels.unsqueeze(1).expand(8, 16),
        )
        torch.testing.assert_close(long, short)


class TestArguments(WarningsAsErrors):
    def test_per_call_values_equal_assigned_values(self):
        student, teacher, labels = random_batch()
        criterion = KLDivLossWithTemperature(5.0, 0.7)
        per_call = criterion(student, teacher, labels, temperature=2.0, alpha=0.4)
        criterion.temperature, criterion.alpha = 2.0, 0.4
        torch.testing.assert_close(per_call, criterion(student, teacher, labels))
        self.assertAlmostEqual(per_call.item(), reference_loss(student, teacher, labels, 2.0, 0.4),
                               places=5)

    def test_bad_temperature_is_rejected_naming_the_value(self):
        for bad in (0.0, -1.5, float("nan"), float("inf")):
            with self.subTest(temperature=bad):
                with self.assertRaisesRegex(ValueError, f"temperature.*{bad!r}"):
                    KLDivLossWithTemperature(temperature=bad)
                criterion = KLDivLossWithTemperature()
                with self.assertRaisesRegex(ValueError, f"temperature.*{bad!r}"):
                    criterion.temperature = bad
                with self.assertRaisesRegex(ValueError, f"temperature.*{bad!r}"):
                    criterion(*random_batch(), temperature=bad)

    def test_bad_alpha_is_rejected_naming_the_value(self):
        for bad in (-0.1, 1.5, float("nan")):
            with self.subTest(alpha=bad):
                with self.assertRaisesRegex(ValueError, f"alpha.*{bad!r}"):
                    KLDivLossWithTemperature(alpha=bad)
                criterion = KLDivLossWithTemperature()
                with self.assertRaisesRegex(ValueError, f"alpha.*{bad!r}"):
                    criterion.alpha = bad
                with self.assertRaisesRegex(ValueError, f"alpha.*{bad!r}"):
                    criterion(*random_batch(), alpha=bad)

    def test_student_and_teacher_shapes_must_match(self):
        student, teacher, labels = random_batch()
        with self.assertRaisesRegex(ValueError, r"\(8, 10\) vs \(8, 9\)"):
            KLDivLossWithTemperature()(student, teacher[:, :9], labels)

    def test_labels_must_match_the_logits(self):
        student, teacher, labels = random_batch()
        with self.assertRaisesRegex(ValueError, r"labels of shape \(7,\)"):
            KLDivLossWithTemperature()(student, teacher, labels[:7])

    def test_logits_need_a_class_dimension(self):
        with self.assertRaisesRegex(ValueError, r"\(10,\)"):
            KLDivLossWithTemperature()(torch.zeros(10), torch.zeros(10))


class TestSchedules(WarningsAsErrors):
    def test_step_temperature_follows_the_formula_where_defined(self):
        for total in EPOCH_COUNTS:
            if total < 3:
                continue
            for epoch in range(total):
                with self.subTest(total=total, epoch=epoch):
                    self.assertEqual(step_temperature(epoch, total),
                                     8 * 0.5 ** (epoch // (total // 3)))

    def test_step_temperature_values_for_short_runs(self):
        self.assertEqual([step_temperature(e, 1) for e in range(1)], [8.0])
        self.assertEqual([step_temperature(e, 2) for e in range(2)], [8.0, 4.0])
        self.assertEqual([step_temperature(e, 10) for e in range(10)],
                         [8.0] * 3 + [4.0] * 3 + [2.0] * 3 + [1.0])

    def test_step_temperature_is_positive_and_non_increasing(self):
        for total in EPOCH_COUNTS:
            values = [step_temperature(epoch, total) for epoch in range(total)]
            with self.subTest(total=total):
                self.assertTrue(all(value > 0 for value in values))
                self.assertEqual(values, sorted(values, reverse=True))

    def test_exponential_alpha_follows_the_formula(self):
        for total in EPOCH_COUNTS:
            for epoch in range(total):
                with self.subTest(total=total, epoch=epoch):
                    self.assertAlmostEqual(exponential_alpha(epoch, total),
                                           0.9 * 0.1 ** (epoch / total), places=15)
        self.assertEqual(exponential_alpha(0, 30), 0.9)
        self.assertAlmostEqual(exponential_alpha(15, 30), 0.9 * 0.1 ** 0.5, places=15)

    def test_constant_is_constant(self):
        for total in EPOCH_COUNTS:
            with self.subTest(total=total):
                self.assertEqual({constant(e, total, value=0.7) for e in range(total)}, {0.7})

    def test_smooth_schedules_run_from_start_to_end_monotonically(self):
        for schedule in (linear, cosine):
            for total in EPOCH_COUNTS:
                values = [schedule(e, total, start=8.0, end=2.0) for e in range(total)]
                with self.subTest(schedule=schedule.__name__, total=total):
                    self.assertEqual(values[0], 8.0)
                    self.assertAlmostEqual(values[-1], 8.0 if total == 1 else 2.0, places=12)
                    self.assertEqual(values, sorted(values, reverse=True))

    def test_smooth_schedule_midpoints(self):
        self.assertAlmostEqual(linear(1, 3, start=8.0, end=2.0), 5.0, places=12)
        self.assertAlmostEqual(cosine(1, 3, start=8.0, end=2.0), 5.0, places=12)
        self.assertAlmostEqual(cosine(1, 4, start=1.0, end=0.0), 0.75, places=12)

    def test_epoch_outside_the_run_is_rejected(self):
        for bad_epoch, total in ((-1, 5), (5, 5)):
            with self.subTest(epoch=bad_epoch, total=total):
                with self.assertRaisesRegex(ValueError, str(bad_epoch)):
                    step_temperature(bad_epoch, total)
        with self.assertRaisesRegex(ValueError, "total_epochs must be >= 1, got 0"):
            exponential_alpha(0, 0)


if __name__ == "__main__":
    unittest.main()
