"""Evaluation metrics: bits per dimension over a data set, Bayes classification accuracy,
and FID with the standard Inception-v3 network (pure PyTorch, no torchvision, no scipy).

    from tarflow_core.metrics import dataset_bpd, bayes_accuracy, load_inception, image_stats
    res = dataset_bpd(model, open_dataset("digits", "test"), batch_size=256,
                      generator=torch.Generator().manual_seed(0))
    net, tag = load_inception()                      # --inception-weights / $TARFLOW_INCEPTION / cache / download
    stats = image_stats(net, (imgs for imgs, _ in batches))
    fid = frechet_distance(*stats.result(), *load_stats("ref.npz"))
"""

from .accuracy import AccuracyCost, AccuracyResult, accuracy_cost, bayes_accuracy
from .bpd import BpdResult, dataset_bpd
from .fid import (
    RunningStats,
    StatsError,
    feature_stats,
    fid_from_stats,
    frechet_distance,
    image_features,
    image_stats,
    load_stats,
    save_stats,
    sqrtm_psd,
    trace_sqrt_product,
)
from .inception import (
    FEATURE_DIM,
    WEIGHTS_FILENAME,
    WEIGHTS_SHA256_PREFIX,
    WEIGHTS_URL,
    FIDInceptionV3,
    InceptionWeightsError,
    cache_dir,
    default_weights_path,
    expected_state_shapes,
    find_weights,
    load_inception,
    load_weights,
    resize_bilinear_tf1,
)
from .samples import SHARD_SIZE, SampleCache, SampleCacheError, sample_shards, shard_seed, to_uint8
from .stats_cache import default_stats_path

__all__ = [
    "AccuracyCost",
    "AccuracyResult",
    "BpdResult",
    "FEATURE_DIM",
    "FIDInceptionV3",
    "InceptionWeightsError",
    "RunningStats",
    "SHARD_SIZE",
    "SampleCache",
    "SampleCacheError",
    "StatsError",
    "WEIGHTS_FILENAME",
    "WEIGHTS_SHA256_PREFIX",
    "WEIGHTS_URL",
    "accuracy_cost",
    "bayes_accuracy",
    "cache_dir",
    "dataset_bpd",
    "default_stats_path",
    "default_weights_path",
    "expected_state_shapes",
    "feature_stats",
    "fid_from_stats",
    "find_weights",
    "frechet_distance",
    "image_features",
    "image_stats",
    "load_inception",
    "load_stats",
    "load_weights",
    "resize_bilinear_tf1",
    "sample_shards",
    "save_stats",
    "shard_seed",
    "sqrtm_psd",
    "to_uint8",
    "trace_sqrt_product",
]
