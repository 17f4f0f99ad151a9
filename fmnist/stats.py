"""The comparison's statistics, computed by scipy and scikit-learn rather than written out here: seeded
percentile-bootstrap confidence intervals over the test images, McNemar's exact test on paired predictions,
paired t-tests (or sign tests) across seeds, and the rule that turns them into a verdict.

Arrays of predictions are shaped (seeds, images): with several seeds, a model's per-image correctness is averaged
over its seeds before resampling images, so an interval covers the test set's sampling for the seed-averaged model.
"""
from __future__ import annotations

import numpy as np
import scipy.stats
from sklearn.metrics import f1_score

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
RESAMPLES = 1000  # bootstrap resamples per interval
SEED = 0  # bootstrap resampling is seeded: the same runs give the same report
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive at 95 %"


def bootstrap_ci(samples: tuple[np.ndarray, ...], statistic, paired: bool = True) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of a vectorised `statistic(*samples, axis)`."""
    result = scipy.stats.bootstrap(samples, statistic, paired=paired, vectorized=True, n_resamples=RESAMPLES,
                                   confidence_level=CONFIDENCE, method="percentile",
                                   rng=np.random.default_rng(SEED))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def accuracy_ci(correct: np.ndarray) -> tuple[float, float]:
    """`correct`: (seeds, images) of 0/1."""
    return bootstrap_ci((correct.mean(0),), mean)


def macro_f1(y: np.ndarray, predicted: np.ndarray, classes: int = 10, average: str = "macro") -> np.ndarray:
    """Macro (or per-class, average="none") F1 of each row of `predicted` (..., images) against `y` (images,),
    by scikit-learn, for many rows (bootstrap resamples) in one call: F1 depends on a row's confusion counts
    alone, so each row becomes its 100 (true, predicted) pairs weighted by their counts, and row r's class k
    becomes class r * classes + k."""
    p = np.asarray(predicted)
    rows = p.reshape(-1, p.shape[-1])
    r, pairs = len(rows), classes * classes
    codes = np.broadcast_to(np.asarray(y), p.shape).reshape(rows.shape) * classes + rows
    counts = np.bincount((codes + np.arange(r)[:, None] * pairs).ravel(), minlength=r * pairs)
    offset = np.repeat(np.arange(r) * classes, pairs)
    true, pred = np.tile(np.arange(pairs) // classes, r) + offset, np.tile(np.arange(pairs) % classes, r) + offset
    per_class = f1_score(true, pred, labels=np.arange(r * classes), sample_weight=counts, average=None,
                         zero_division=0).reshape(*p.shape[:-1], classes)
    return per_class if average == "none" else per_class.mean(-1)


def macro_f1_ci(y: np.ndarray, *predicted: np.ndarray) -> list[tuple[float, float]]:
    """Intervals of each model's seed-averaged macro F1; each of `predicted`: (seeds, images). One bootstrap
    for all models: they are scored on the same resampled images, in one scikit-learn call."""
    def statistic(index, axis=-1):
        index = index.astype(int)
        scores = macro_f1(y[index], np.stack([p[:, index] for p in predicted]))  # (models, seeds, resamples)
        return scores.mean(1)

    result = scipy.stats.bootstrap((np.arange(len(y)),), statistic, vectorized=True, n_resamples=RESAMPLES,
                                   confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(SEED))
    return list(zip(np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)))


def difference_ci(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, float]:
    """Paired bootstrap interval of accuracy(a) - accuracy(b): the same test images resampled for both."""
    return bootstrap_ci(((correct_a - correct_b).mean(0),), mean)


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, int, int]:
    """McNemar's exact test of one seed's paired predictions: (p-value, images only a got right, only b).

    The exact test is, by its definition, the two-sided binomial test of the discordant pairs: of the images
    exactly one model got right, is a's share 1/2? (statsmodels' mcnemar(exact=True) computes this same binomial
    test; scipy's is used here as it is already loaded, where statsmodels would add 1.3 s to `fmnist compare`.)"""
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    if a_only + b_only == 0:
        return 1.0, 0, 0  # the two models agree on every image: no evidence of a difference
    return float(scipy.stats.binomtest(a_only, a_only + b_only, 0.5).pvalue), a_only, b_only


def gap_difference_ci(train_a: np.ndarray, train_b: np.ndarray, test_a: np.ndarray,
                      test_b: np.ndarray) -> tuple[float, float]:
    """Interval of gap(a) - gap(b), gap = accuracy on the training split - test accuracy. The training split is
    the fixed set each model was fitted on, so its accuracy is a property of the fitted model, not an estimate:
    the uncertainty is the test set's, and the interval is the paired test-difference interval shifted by the
    training-accuracy difference. Arrays: (seeds, images) of 0/1."""
    train = float(train_a.mean() - train_b.mean())
    low, high = difference_ci(test_a, test_b)
    return train - high, train - low


def class_gain_ci(y: np.ndarray, new: np.ndarray, old: np.ndarray, group: list[int]) -> tuple[float, float]:
    """Interval of [mean F1 gain of `new` over `old` on the classes in `group`] - [the same on the other classes]:
    above 0 when the gains concentrate on `group`. `new`, `old`: (seeds, images) predictions."""
    rest = [k for k in range(10) if k not in group]

    def statistic(index, axis=-1):
        index = index.astype(int)
        gain = np.mean([macro_f1(y[index], n[index], average="none") - macro_f1(y[index], o[index], average="none")
                        for n, o in zip(new, old)], axis=0)
        return gain[..., group].mean(-1) - gain[..., rest].mean(-1)

    return bootstrap_ci((np.arange(len(y)),), statistic)


def seeds_p_value(differences: list[float]) -> float | None:
    """Two-sided test that paired per-seed differences centre on 0: a paired t-test, or the sign test where a
    difference is infinite (a model that never got there). None with fewer than 2 seeds or no variation."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return None
    if not np.isfinite(d).all():
        return float(scipy.stats.binomtest(int((d > 0).sum()), int((d != 0).sum()), 0.5).pvalue)
    if np.allclose(d, d.mean()):
        return None  # no run-to-run variation to test against
    return float(scipy.stats.ttest_1samp(d, 0.0).pvalue)


def verdict(low: float, high: float, p_value: float | None = 0.0, consistent: bool = True) -> str:
    """For a claim measured as a difference that is positive when the claim holds: supported when the interval
    lies above 0, contradicted when it lies below, and in both cases the test agrees (p < 0.05) and every seed
    points the same way; otherwise inconclusive."""
    if p_value is None or p_value >= ALPHA or not consistent:
        return INCONCLUSIVE
    if low > 0:
        return SUPPORTED
    if high < 0:
        return CONTRADICTED
    return INCONCLUSIVE
