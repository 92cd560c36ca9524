"""The evaluation metrics against scikit-learn on fixed predictions."""
import numpy as np
import pytest
from sklearn import metrics as skm

from uniemox_jax import metrics

NAMES = [f"c{i}" for i in range(6)]


def _fixed(seed=0, n=97, classes=6, absent=None):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  if absent is not None:
    labels[labels == absent] = (absent + 1) % classes
  # Scores correlated with the labels, so the metrics are neither 0 nor 1.
  scores = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[labels]
  return scores, labels


@pytest.mark.parametrize("absent", [None, 3])
def test_single_label_metrics_equal_sklearn(absent):
  scores, labels = _fixed(absent=absent)
  report = metrics.classification_report(scores, labels, NAMES, top_k=3)
  preds = scores.argmax(1)
  classes = list(range(6))
  assert report["top1"] == pytest.approx(skm.accuracy_score(labels, preds))
  assert report["top3"] == pytest.approx(
      skm.top_k_accuracy_score(labels, scores, k=3, labels=classes))
  assert report["macro_f1"] == pytest.approx(
      skm.f1_score(labels, preds, average="macro", labels=classes, zero_division=0))
  np.testing.assert_array_equal(report["confusion_matrix"],
                                skm.confusion_matrix(labels, preds, labels=classes))
  recall = skm.recall_score(labels, preds, average=None, labels=classes, zero_division=0)
  for i, name in enumerate(NAMES):
    if i == absent:
      assert report["per_class_accuracy"][name] is None     # no example: not a 0
    else:
      assert report["per_class_accuracy"][name] == pytest.approx(recall[i])


def test_average_precision_equals_sklearn_with_ties():
  rng = np.random.default_rng(1)
  targets = (rng.random((80, 5)) < 0.3).astype(int)
  targets[:, 4] = 0                                     # a class with no positive example
  scores = np.round(rng.random((80, 5)) + 0.5 * targets, 1)   # rounding makes ties
  report = metrics.multilabel_report(scores, targets, NAMES[:5])
  expect = [skm.average_precision_score(targets[:, c], scores[:, c]) for c in range(4)]
  for c in range(4):
    assert report["per_class_ap"][NAMES[c]] == pytest.approx(expect[c])
  assert report["per_class_ap"][NAMES[4]] is None
  assert report["mAP"] == pytest.approx(np.mean(expect))


def test_table_lists_every_class():
  scores, labels = _fixed()
  table = metrics.format_table(metrics.classification_report(scores, labels, NAMES), "t")
  assert table.splitlines()[0] == "t"
  assert "top1=" in table and all(name in table for name in NAMES)
