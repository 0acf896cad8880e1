"""Evaluation metrics (docs/design.md, Evaluation): Frechet distance, KID, precision/recall, feature networks.

Public API (tests outside the project call exactly these):
    metrics.frechet_distance(mu1, sigma1, mu2, sigma2) -> float
    metrics.kernel_inception_distance(feats1, feats2, *, subsets=100, subset_size=1000, seed=0) -> (mean, std)

Metric names: the FID Inception yields ``fid`` / ``kid``; the project's classifier yields
``fd_<dataset>`` / ``kid_<dataset>`` (never "FID"); both yield ``precision`` and ``recall``.
"""

from pd_core.metrics.classifier import (
    ClassifierFeatures,
    FeatureClassifier,
    classifier_accuracy,
    load_or_train_classifier,
    train_feature_classifier,
)
from pd_core.metrics.evaluate import evaluate_sampler, real_floor, sample_noise
from pd_core.metrics.features import (
    ByteStore,
    FeatureExtractor,
    MemoryByteStore,
    ReferenceFeatures,
    extract_features,
    load_or_compute_reference,
)
from pd_core.metrics.inception import FIDInceptionV3, InceptionWeightsError, load_inception, read_state_dict
from pd_core.metrics.kid import kernel_inception_distance, polynomial_mmd2_unbiased, precision_recall
from pd_core.metrics.stats import FeatureStats, StreamingStats, frechet_distance, frechet_distance_stats
from pd_core.metrics.table import quality_long, quality_table, select_best

__all__ = [
    "ByteStore", "ClassifierFeatures", "FIDInceptionV3", "FeatureClassifier", "FeatureExtractor", "FeatureStats",
    "InceptionWeightsError", "MemoryByteStore", "ReferenceFeatures", "StreamingStats", "classifier_accuracy",
    "evaluate_sampler", "extract_features", "frechet_distance", "frechet_distance_stats",
    "kernel_inception_distance", "load_inception", "load_or_compute_reference", "load_or_train_classifier",
    "polynomial_mmd2_unbiased", "precision_recall", "quality_long", "quality_table", "read_state_dict",
    "real_floor", "sample_noise", "select_best", "train_feature_classifier",
]
