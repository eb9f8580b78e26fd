"""mininp_segformer: SegFormer in pure NumPy (MiT-b0..b5 encoder + all-MLP decoder), Hugging Face checkpoints.

    import mininp_segformer as ms
    model = ms.load("path/to/segformer-b0-finetuned-ade-512-512")   # config.json + model.safetensors
    seg = ms.predict("photo.jpg", model)                            # (H, W) class ids at the photo's size
"""

import os

from .config import SegformerConfig, variant_config
from .inference import segment
from .kernels import set_num_threads
from .model import Segformer, SegformerOutput, load, predict
from .preprocessing import postprocess, preprocess
from .weights import CheckpointError

__all__ = ["SegformerConfig", "variant_config", "Segformer", "SegformerOutput", "load", "predict",
           "preprocess", "postprocess", "segment", "CheckpointError", "set_num_threads"]

if os.environ.get("MININP_SEGFORMER_THREADS"):
    set_num_threads(int(os.environ["MININP_SEGFORMER_THREADS"]))
__version__ = "0.1.0"
