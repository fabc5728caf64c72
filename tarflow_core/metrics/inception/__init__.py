"""The FID Inception-v3 network in plain PyTorch, and where its weights come from.

This is the network every common FID tool uses: the TensorFlow graph ``inception-2015-12-05``
(1008 classes), read at its 2048-d final pool.

- :mod:`.network`: :class:`FIDInceptionV3`, the graph with its 2015 quirks;
- :mod:`.preprocessing`: 0..255 images to the network's input (TF 1.x bilinear resize by default);
- :mod:`.weights`: finding, downloading and strictly loading the published weight file, and
  :func:`load_inception`, which builds the network with them.
"""

from .network import FEATURE_DIM, MIN_INPUT_SIZE, BlockA, BlockB, BlockC, BlockD, BlockE, ConvBN, FIDInceptionV3
from .preprocessing import INPUT_SIZE, RESIZE_MODES, preprocess, resize_bilinear_tf1
from .weights import (
    ENV_VAR,
    OTHER_FILENAMES,
    WEIGHTS_FILENAME,
    WEIGHTS_SHA256_PREFIX,
    WEIGHTS_URL,
    InceptionWeightsError,
    cache_dir,
    candidate_paths,
    default_weights_path,
    download_weights,
    expected_state_shapes,
    file_sha256,
    find_weights,
    load_inception,
    load_state,
    load_weights,
    random_init,
)

__all__ = [
    "BlockA",
    "BlockB",
    "BlockC",
    "BlockD",
    "BlockE",
    "ConvBN",
    "ENV_VAR",
    "FEATURE_DIM",
    "FIDInceptionV3",
    "INPUT_SIZE",
    "InceptionWeightsError",
    "MIN_INPUT_SIZE",
    "OTHER_FILENAMES",
    "RESIZE_MODES",
    "WEIGHTS_FILENAME",
    "WEIGHTS_SHA256_PREFIX",
    "WEIGHTS_URL",
    "cache_dir",
    "candidate_paths",
    "default_weights_path",
    "download_weights",
    "expected_state_shapes",
    "file_sha256",
    "find_weights",
    "load_inception",
    "load_state",
    "load_weights",
    "preprocess",
    "random_init",
    "resize_bilinear_tf1",
]
