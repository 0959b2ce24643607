"""The fine-tuning validation gate's rule, on held-out scores with known answers.

:func:`bluesky_xsml.training.finetune._gate` decides a round from the parent's and the new
network's probabilities; here they are written by hand, so every edge (an improvement equal
to ``min_improvement``, forgetting equal to ``max_forgetting``, a new tag scored as the
constant predictor, no tag with both classes, no held-out frames) has an exact answer and an
exact reason. No training runs: the end-to-end rounds are in ``tests/test_finetune.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bluesky_xsml.training.finetune import FinetuneReport, _gate
from bluesky_xsml.training.metrics import average_precision

NAN = np.nan
TAGS = ("a", "b", "c")
NEW = ["c"]
# tag a: both classes; tag b: unknown everywhere; tag c (new): both classes
Y = np.array([[1, NAN, 1], [0, NAN, 1], [1, NAN, 0], [0, NAN, 0]], np.float32)
PERFECT_A = [0.9, 0.1, 0.8, 0.2]
REVERSED_A = [0.1, 0.9, 0.2, 0.8]
PERFECT_C = [0.9, 0.8, 0.2, 0.1]
AP_REVERSED = (1 / 3 + 2 / 4) / 2          # positives ranked 3rd and 4th
C_AFTER = [0.9, 0.2, 0.8, 0.1]              # positives ranked 1st and 3rd
AP_C_AFTER = (1 + 2 / 3) / 2


def scores(a, c, b=(0.5, 0.5, 0.5, 0.5)) -> np.ndarray:
    return np.array([a, b, c], np.float32).T.copy()


def report(**limits) -> FinetuneReport:
    return FinetuneReport(passed=True, reason="unset", parent_id="parent", **limits)


def decide(rep, y=Y, before=None, after=None, *, n_labeled=8, original=None, new_tags=NEW):
    _gate(rep, y, before, after, out_tags=TAGS, new_tags=new_tags, n_labeled=n_labeled,
          original=original)
    return rep


def test_the_ap_arithmetic_of_these_tests():
    assert average_precision(Y[:, 0], np.float32(REVERSED_A)) == pytest.approx(AP_REVERSED)
    assert average_precision(Y[:, 2], np.float32(C_AFTER)) == pytest.approx(AP_C_AFTER)


def test_improvement_passes_and_a_new_tag_starts_from_its_positive_rate():
    # the parent's scores for the new tag c are perfect, but it has no such output: its
    # "before" is the constant predictor's AP, the positive rate 0.5
    rep = decide(report(), before=scores(REVERSED_A, PERFECT_C),
                 after=scores(PERFECT_A, C_AFTER))
    assert rep.passed is True
    assert rep.new_domain_metric == "mAP"
    assert rep.new_domain_tags == ["a", "c"]
    before, after = (AP_REVERSED + 0.5) / 2, (1.0 + AP_C_AFTER) / 2
    assert rep.new_domain_before == pytest.approx(before, abs=1e-6)
    assert rep.new_domain_after == pytest.approx(after, abs=1e-6)
    assert rep.new_tag_ap == {"c": 0.8333}
    assert rep.reason == (f"held-out new-domain mAP {before:.4f} -> {after:.4f}; "
                          "original domain not checked (no synthetic validation set)")
    assert math.isnan(rep.original_before) and math.isnan(rep.original_after)


def test_a_known_tag_is_scored_by_the_parent():
    rep = decide(report(), before=scores(PERFECT_A, PERFECT_C),
                 after=scores(REVERSED_A, C_AFTER), new_tags=[])
    assert rep.new_tag_ap == {}
    assert rep.new_domain_before == pytest.approx(1.0)
    assert rep.new_domain_after == pytest.approx((AP_REVERSED + AP_C_AFTER) / 2, abs=1e-6)
    assert rep.passed is False
    assert rep.reason.startswith(
        f"held-out new-domain mAP did not improve (1.0000 -> {rep.new_domain_after:.4f}, "
        "4 frames); ")


def test_an_improvement_must_exceed_min_improvement():
    before_s, after_s = scores(REVERSED_A, PERFECT_A), scores(PERFECT_A, C_AFTER)
    probe = decide(report(), before=before_s, after=after_s)
    gain = probe.new_domain_after - probe.new_domain_before
    on = decide(report(min_improvement=gain), before=before_s, after=after_s)
    assert on.passed is False
    assert on.reason.startswith(
        f"held-out new-domain mAP did not improve ({on.new_domain_before:.4f} -> "
        f"{on.new_domain_after:.4f}, 4 frames)")
    below = decide(report(min_improvement=float(np.nextafter(gain, 0))), before=before_s,
                   after=after_s)
    assert below.passed is True
    # no change is no improvement, even with the default limit of 0
    same = decide(report(), before=after_s, after=after_s, new_tags=[])
    assert same.passed is False and same.new_domain_before == same.new_domain_after


def test_without_a_tag_of_both_classes_the_masked_loss_must_fall():
    y = np.array([[1, NAN, NAN], [1, NAN, NAN], [NAN, NAN, 0], [NAN, NAN, NAN]], np.float32)
    low = scores([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5])
    high = scores([0.9, 0.9, 0.5, 0.5], [0.5, 0.5, 0.1, 0.5])
    rep = decide(report(), y, before=low, after=high)
    loss_low = math.log(2)
    loss_high = -(2 * math.log(0.9) + math.log(0.9)) / 3
    assert rep.new_domain_metric == "loss" and rep.new_domain_tags == []
    assert rep.new_domain_before == pytest.approx(loss_low, rel=1e-5)
    assert rep.new_domain_after == pytest.approx(loss_high, rel=1e-5)
    assert rep.passed is True
    assert rep.reason == (f"held-out new-domain loss {loss_low:.4f} -> {loss_high:.4f} (no tag "
                          "has both classes held out); original domain not checked (no "
                          "synthetic validation set)")
    worse = decide(report(), y, before=high, after=low)
    assert worse.passed is False
    assert worse.reason.startswith(
        f"held-out new-domain loss did not fall ({loss_high:.4f} -> {loss_low:.4f}; no tag has "
        "both classes held out); ")
    assert decide(report(), y, before=low, after=low).passed is False


def test_no_held_out_frames_fail_the_gate():
    rep = decide(report(), np.zeros((0, 3), np.float32), n_labeled=3)
    assert rep.passed is False
    assert rep.reason == ("no held-out labeled frames to validate on (3 labeled; need at least "
                          "4); original domain not checked (no synthetic validation set)")
    assert math.isnan(rep.new_domain_before) and rep.new_domain_tags == []


GOOD = {"before": scores(REVERSED_A, PERFECT_A), "after": scores(PERFECT_A, C_AFTER)}


def test_forgetting_up_to_max_forgetting_passes():
    rep = decide(report(max_forgetting=0.125), original=(0.75, 0.625), **GOOD)
    assert rep.passed is True
    assert (rep.original_before, rep.original_after) == (0.75, 0.625)
    assert rep.reason.endswith("; original-domain mAP 0.7500 -> 0.6250")
    better = decide(report(), original=(0.5, 0.75), **GOOD)
    assert better.passed is True and better.reason.endswith("original-domain mAP 0.5000 -> 0.7500")


def test_forgetting_more_than_max_forgetting_fails():
    rep = decide(report(max_forgetting=float(np.nextafter(0.125, 0))), original=(0.75, 0.625),
                 **GOOD)
    assert rep.passed is False
    assert rep.reason.endswith(
        "; original-domain mAP fell 12.50 points (0.7500 -> 0.6250; allowed 12.50)")
    rep = decide(report(max_forgetting=0.01), original=(0.9, 0.85), **GOOD)
    assert rep.passed is False and "fell 5.00 points (0.9000 -> 0.8500; allowed 1.00)" in rep.reason
    # an original domain that cannot be scored any more is not a pass
    assert decide(report(), original=(0.9, math.nan), **GOOD).passed is False


def test_both_checks_are_reported_when_both_fail():
    rep = decide(report(), original=(0.9, 0.5), before=GOOD["after"], after=GOOD["before"])
    assert rep.passed is False
    first, second = rep.reason.split("; ", 1)
    assert first.startswith("held-out new-domain mAP did not improve")
    assert second.startswith("original-domain mAP fell 40.00 points")


def test_certain_scores_cost_a_bounded_loss():
    """A network sure of itself outputs exactly 0 or 1 in float32: each known label then
    costs at most -log(1e-6), and a right answer about nothing (never log(0) or 0 * inf)."""
    y = np.array([[1, NAN, 0], [1, NAN, NAN], [NAN, NAN, 0], [NAN, NAN, NAN]], np.float32)
    half = scores([0.5] * 4, [0.5] * 4)
    right = scores([1.0, 1.0, 0.5, 0.5], [0.0, 0.5, 0.0, 0.5])
    wrong = scores([0.0, 0.0, 0.5, 0.5], [1.0, 0.5, 1.0, 0.5])
    rep = decide(report(), y, before=half, after=right)
    assert rep.passed is True and rep.new_domain_metric == "loss"
    assert rep.new_domain_after == pytest.approx(1e-6, rel=0.05)
    rep = decide(report(), y, before=half, after=wrong)
    assert rep.passed is False
    # -log(1e-6) = 13.8155 per label (a little less where float32 rounds 1 - 1e-6)
    assert rep.new_domain_after == pytest.approx(13.81, abs=0.01)
