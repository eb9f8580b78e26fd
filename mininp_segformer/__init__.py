"""mininp_segformer: SegFormer in pure NumPy (MiT-b0..b5 encoder + all-MLP decoder), Hugging Face checkpoints.

    import mininp_segformer as ms
    model = ms.load("path/to/segformer-b0-finetuned-ade-512-512")   # config.json + model.safetensors
    seg = ms.predict("photo.jpg", model)                            # (H, W) class ids at the photo's size
"""

from .config import SegformerConfig, variant_config
from .model import Segformer, SegformerOutput, load, predict
from .preprocessing import postprocess, preprocess
from .weights import CheckpointError

__all__ = ["SegformerConfig", "variant_config", "Segformer", "SegformerOutput", "load", "predict",
           "preprocess", "postprocess", "CheckpointError"]
__version__ = "0.1.0"
