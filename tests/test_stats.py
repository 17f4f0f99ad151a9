"""The comparison's statistics against hand-worked cases, and its verdicts and report on constructed predictions
(offline: no MLflow)."""
import re
import zlib

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from fmnist import stats
from fmnist.compare import Comparison, Evidence, judge, models_table, pairs_table, per_class_table
from fmnist.data import CLASSES
from fmnist.report import write_report


def test_mcnemar_exact_p_value_of_a_known_discordance_table():
    # 10 both right, 1 only a, 9 only b, 10 neither: exact two-sided binomial p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = np.array([1] * 10 + [1] * 1 + [0] * 9 + [0] * 10, bool)
    b = np.array([1] * 10 + [0] * 1 + [1] * 9 + [0] * 10, bool)
    p, a_only, b_only = stats.mcnemar_test(a, b)
    assert (a_only, b_only) == (1, 9) and p == pytest.approx(2 * 11 / 1024)


def test_bootstrap_accuracy_interval_matches_the_normal_approximation():
    correct = np.array([[1] * 9000 + [0] * 1000], float)  # accuracy 0.9 on 10,000 images
    half = 1.96 * np.sqrt(0.9 * 0.1 / 10_000)  # 0.00588
    low, high = stats.accuracy_ci(correct)
    assert low == pytest.approx(0.9 - half, abs=0.0015) and high == pytest.approx(0.9 + half, abs=0.0015)
    assert stats.accuracy_ci(np.ones((1, 100))) == (1.0, 1.0)
    assert stats.accuracy_ci(correct) == (low, high)  # seeded: the same numbers every time


def test_paired_difference_interval():
    a = np.ones((1, 10_000))
    b = np.array([[1] * 9000 + [0] * 1000], float)
    low, high = stats.difference_ci(a, b)  # a - b per image: 1,000 ones, 9,000 zeros
    assert low == pytest.approx(0.1 - 0.00588, abs=0.0015) and high == pytest.approx(0.1 + 0.00588, abs=0.0015)
    assert stats.difference_ci(b, b) == (0.0, 0.0)


def test_macro_f1_is_scikit_learns():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 1000)
    predicted = np.where(rng.random(1000) < 0.8, y, rng.integers(0, 10, 1000))
    assert stats.macro_f1(y, predicted) == pytest.approx(f1_score(y, predicted, average="macro"), abs=1e-6)
    per_class = stats.macro_f1(y, np.stack([predicted, y]), average="none")
    assert per_class.shape == (2, 10) and per_class[1].tolist() == [1.0] * 10


def test_gap_and_class_gain_intervals_point_the_right_way():
    train_a, test_a = np.ones((1, 1000)), np.array([[1] * 800 + [0] * 200], float)  # gap 0.2
    train_b, test_b = np.ones((1, 1000)), np.array([[1] * 950 + [0] * 50], float)  # gap 0.05
    low, high = stats.gap_difference_ci(train_a, train_b, test_a, test_b)
    test_low, test_high = stats.difference_ci(test_a, test_b)  # -0.15 +- the test set's sampling error
    assert (low, high) == pytest.approx((-test_high, -test_low)) and 0.1 < low < 0.15 < high < 0.2
    y = np.repeat(np.arange(10), 100)
    old = np.where(np.isin(y, [0, 2]) & (np.arange(1000) % 2 == 0), (y + 1) % 10, y)  # wrong on half of 0 and 2
    low, high = stats.class_gain_ci(y, y[None], old[None], group=[0, 2])
    assert low > 0  # the gain is on the group
    low, high = stats.class_gain_ci(y, y[None], old[None], group=[5, 6])
    assert high < 0


def test_seed_level_tests():
    assert stats.seeds_p_value([1.0, 2.0, 3.0]) == pytest.approx(0.0742, abs=1e-4)  # t = 2 / (1 / sqrt 3), 2 df
    assert stats.seeds_p_value([np.inf, np.inf, np.inf]) == pytest.approx(0.25)  # sign test: 3 of 3
    assert stats.seeds_p_value([5.0]) is None


@pytest.mark.parametrize("low,high,p,consistent,expected", [
    (0.01, 0.03, 0.001, True, stats.SUPPORTED),
    (-0.03, -0.01, 0.001, True, stats.CONTRADICTED),
    (-0.01, 0.03, 0.2, True, stats.INCONCLUSIVE),
    (0.01, 0.03, 0.2, True, stats.INCONCLUSIVE),  # the interval and the test disagree
    (0.01, 0.03, 0.001, False, stats.INCONCLUSIVE),  # the seeds disagree
    (0.01, 0.03, None, True, stats.INCONCLUSIVE),  # nothing to test against
])
def test_verdict_rule(low, high, p, consistent, expected):
    assert stats.verdict(low, high, p, consistent) == expected


def evidence(arch: str, accuracy: float, seeds: int = 1, hard: tuple[str, ...] = ()) -> Evidence:
    """A model right on `accuracy` of 2,000 test images (wrong ones spread over the classes, more on `hard`)."""
    rng = np.random.default_rng(zlib.crc32(arch.encode()))  # hash() of a str changes with every process
    labels = np.repeat(np.arange(10), 200)
    probabilities, histories = [], []
    for seed in range(seeds):
        wrong = rng.random(len(labels)) > accuracy
        wrong |= np.isin(labels, [CLASSES.index(c) for c in hard]) & (rng.random(len(labels)) < 0.3)
        predicted = np.where(wrong, (labels + 1 + seed) % 10, labels)
        p = np.full((len(labels), 10), 0.02)
        p[np.arange(len(labels)), predicted] = 0.82
        probabilities.append(p)
        histories.append(pd.DataFrame({"epoch": [1, 2, 3], "val_accuracy": [0.8, accuracy, accuracy],
                                       "elapsed_seconds": [10.0, 20.0, 30.0]}))
    train = (rng.random((seeds, 5000)) < min(1.0, accuracy + 0.02)).astype(int)
    return Evidence(arch, [f"{arch}{s}" for s in range(seeds)], [str(s) for s in range(seeds)], labels,
                    np.stack(probabilities), train, histories,
                    [{"test_ece": 0.05, "params_count": 1000, "train_seconds": 30}] * seeds)


def comparison(evidence: dict[str, Evidence]) -> Comparison:
    pairs, per_class = pairs_table(evidence), per_class_table(evidence)
    return Comparison(models_table(evidence), pairs, per_class, judge(evidence, pairs, per_class), evidence)


@pytest.mark.parametrize("seeds", [1, 2])
def test_verdicts_on_constructed_predictions(seeds):
    c = comparison({"ann": evidence("ann", 0.85, seeds, hard=("Shirt", "Coat", "Pullover", "T-shirt/top")),
                    "cnn": evidence("cnn", 0.95, seeds), "transfer": evidence("transfer", 0.949, seeds)})
    verdicts = {v["claim"]: v["verdict"] for v in c.verdicts}
    assert verdicts["CNN beats ANN"] == stats.SUPPORTED
    assert verdicts["Transfer beats ANN"] == stats.SUPPORTED
    assert verdicts["Transfer beats CNN"] == stats.INCONCLUSIVE  # 0.1 points on 2,000 images
    similar = next(v for k, v in verdicts.items() if k.startswith("The CNN's largest per-class gains"))
    assert similar == stats.SUPPORTED
    if seeds == 2:
        assert c.models.loc["cnn", "test_accuracy_std"] >= 0 and "cnn_vs_ann_p_value" in c.headline()
    reversed_ = comparison({"ann": evidence("ann", 0.95, seeds), "cnn": evidence("cnn", 0.85, seeds)})
    assert {v["claim"]: v["verdict"] for v in reversed_.verdicts}["CNN beats ANN"] == stats.CONTRADICTED


def test_the_html_report_is_self_contained_and_the_markdown_has_every_part(tmp_path):
    markdown = write_report(tmp_path, comparison({"ann": evidence("ann", 0.85, 2), "cnn": evidence("cnn", 0.95, 2),
                                                  "transfer": evidence("transfer", 0.9, 2)}))
    page = (tmp_path / "report.html").read_text()
    references = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    assert references and all(r.startswith(("data:image/png;base64,", "#")) for r in references)
    assert "tags.architecture" not in page and "<h2>Verdicts" in page
    for part in ("## Models", "## Pairs", "## Verdicts on the study's claims", "## Per-class test F1", " ± "):
        assert part in markdown
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    assert {"p_value", "ci_low", "ci_high", "difference"} <= set(pairs.columns) and len(pairs) == 3
    assert {p.name for p in tmp_path.glob("*.png")} == {"per_class_f1.png", "train_vs_test.png", "convergence.png",
                                                         "reliability.png"}
