"""mininp_segformer: SegFormer in pure NumPy (MiT-b0..b5 encoder + all-MLP decoder), Hugging Face checkpoints.

    import mininp_segformer as ms
    model = ms.load("path/to/segformer-b0-finetuned-ade-512-512")   # config.json + model.safetensors
    seg = ms.predict("photo.jpg", model)                            # (H, W) class ids at the photo's size
"""

import os

# OpenBLAS's threads spin for a while after each matrix product before they sleep, holding the cores that the numba
# kernels between the products need (docs/performance.md, "Threads", has the measurement). OpenBLAS reads this when
# NumPy loads it, so it only takes effect if NumPy was not imported first.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .config import SegformerConfig, variant_config  # noqa: E402
from .errors import (CheckpointError, ConfigError, DownloadError, ImageError, LabelError,  # noqa: E402
                     MachineError, ResourceError, SegformerError)
from .inference import segment  # noqa: E402
from .model import Segformer, SegformerOutput, load, predict, value_and_grad  # noqa: E402
from .preprocessing import postprocess, preprocess  # noqa: E402
from .threads import code_paths, set_num_threads  # noqa: E402
from .memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # reuse freed activations instead of fresh pages at every forward pass (memory.py)

__all__ = ["SegformerConfig", "variant_config", "Segformer", "SegformerOutput", "load", "predict",
           "preprocess", "postprocess", "segment", "set_num_threads", "code_paths", "value_and_grad",
           "SegformerError", "ConfigError", "CheckpointError", "DownloadError", "ImageError", "LabelError",
           "ResourceError", "MachineError"]

if os.environ.get("MININP_SEGFORMER_THREADS"):
    set_num_threads(int(os.environ["MININP_SEGFORMER_THREADS"]))
__version__ = "0.1.0"
