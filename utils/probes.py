"""Linear probes of frozen features and their scores: a standardised, L2-regularised logistic
regression per layer, trained on the train participants' items and scored on the held-out
participants' only; accuracy, macro-F1 and unweighted average recall (UAR) with bootstrap 95 %
intervals over the test items, chance levels, and paired differences between two models."""

from __future__ import annotations

import warnings

import numpy as np

METRICS = ("accuracy", "macro_f1", "uar")
# The headline metric: best layer, plots and gains. UAR and macro-F1 do not reward predicting the
# majority class, which in home recordings (mostly silence, few child vocalisations) accuracy does.
HEADLINE = "macro_f1"


def scores(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, and over the classes present in `truth`: mean F1 and mean recall."""
    confusion = np.bincount(truth * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, -1)
    return scores_of_confusion(confusion)


def scores_of_confusion(confusion: np.ndarray) -> dict[str, float]:
    correct = np.diag(confusion).astype(np.float64)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    present = true_counts > 0
    recall = correct[present] / true_counts[present]
    precision = np.divide(correct, predicted_counts, out=np.zeros_like(correct), where=predicted_counts > 0)[present]
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(recall), where=precision + recall > 0)
    return {
        "accuracy": float(correct.sum() / max(1, confusion.sum())),
        "macro_f1": float(f1.mean()),
        "uar": float(recall.mean()),
    }


class Bootstrap:
    """Resampled test-item indices, drawn afresh from the same seed on each pass: the same resamples
    for every model and layer of a run (their intervals and differences are paired), without holding
    them all in memory (frame-level test sets are large)."""

    def __init__(self, num_items: int, num_resamples: int, seed: int):
        self.num_items, self.num_resamples, self.seed = num_items, num_resamples, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for _ in range(self.num_resamples):
            yield rng.integers(0, self.num_items, size=self.num_items)


def interval(value: float, draws) -> dict[str, float]:
    """A figure and its 95 % percentile interval over bootstrap draws."""
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"value": float(value), "low": float(low), "high": float(high)}


def with_interval(
    truth: np.ndarray, predicted: np.ndarray, num_classes: int, resamples: Bootstrap
) -> dict[str, dict[str, float]]:
    """Each metric's value and its bootstrap 95 % percentile interval over the test items."""
    point = scores(truth, predicted, num_classes)
    draws = {metric: [] for metric in METRICS}
    for sample in resamples:
        for metric, value in scores(truth[sample], predicted[sample], num_classes).items():
            draws[metric].append(value)
    return {metric: interval(point[metric], draws[metric]) for metric in METRICS}


def paired_difference(
    truth: np.ndarray, predicted_a, predicted_b, num_classes: int, resamples: Bootstrap, metric: str = HEADLINE
) -> dict[str, float]:
    """Score of b minus score of a on the same test items, with a paired bootstrap 95 % interval."""
    predicted_a, predicted_b = np.asarray(predicted_a), np.asarray(predicted_b)
    point = scores(truth, predicted_b, num_classes)[metric] - scores(truth, predicted_a, num_classes)[metric]
    draws = [
        scores(truth[s], predicted_b[s], num_classes)[metric] - scores(truth[s], predicted_a[s], num_classes)[metric]
        for s in resamples
    ]
    return interval(point, draws)


def chance_scores(train_truth: np.ndarray, test_truth: np.ndarray, num_classes: int, seed: int) -> dict[str, float]:
    """Expected scores of guessing at random with the train items' label frequencies (for UAR: 1 /
    classes), averaged over 1000 guesses."""
    priors = np.bincount(train_truth, minlength=num_classes) / len(train_truth)
    rng = np.random.default_rng(seed)
    draws = [scores(test_truth, rng.choice(num_classes, len(test_truth), p=priors), num_classes) for _ in range(1000)]
    return {metric: float(np.mean([d[metric] for d in draws])) for metric in METRICS}


def fit_and_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, regularization: float, seed: int
) -> np.ndarray:
    """A logistic regression on standardised features, classes weighted by their inverse frequency
    (the rare classes are the ones users care about); returns the test predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=regularization, class_weight="balanced", max_iter=2000, random_state=seed),
    )
    with warnings.catch_warnings():  # a probe that stops at max_iter still scores; the table says how well
        warnings.simplefilter("ignore")
        probe.fit(train_x, train_y)
    return probe.predict(test_x)


def probe_layers(
    features: np.ndarray,
    targets: np.ndarray,
    train_index: np.ndarray,
    test_index: np.ndarray,
    num_classes: int,
    resamples: Bootstrap,
    regularization: float,
    seed: int,
    layers: list[int],
) -> dict[str, dict]:
    """{layer: {metric: {value, low, high}, "predictions": [...]}} for features (items, layers, dim)."""
    results = {}
    train_y, test_y = targets[train_index], targets[test_index]
    for layer in layers:
        predicted = fit_and_predict(
            features[train_index, layer], train_y, features[test_index, layer], regularization, seed
        )
        results[str(layer)] = {
            **with_interval(test_y, predicted, num_classes, resamples),
            "predictions": predicted.astype(int).tolist(),
        }
    return results


def best_layer(layers: dict[str, dict], metric: str = HEADLINE) -> int:
    """The layer with the highest score (the lowest one of a tie)."""
    return int(max(layers, key=lambda layer: (layers[layer][metric]["value"], -int(layer))))
