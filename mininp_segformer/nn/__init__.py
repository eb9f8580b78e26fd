"""The network: SegFormer's components as functions on arrays, on one of two backends.

    layers.py     the readable NumPy truth: every building block (linear, LayerNorm, GELU, softmax, convolutions,
                  BatchNorm, bilinear resize) as a short function
    kernels.py    numba twins of the hot ones, with the same names and signatures, tested equal to them
    attention.py  efficient self-attention with spatial reduction (Eq. 1-2)
    encoder.py    overlap patch merging, Mix-FFN (Eq. 3), the transformer block, the MiT encoder and its geometry
    decoder.py    the all-MLP decode head (Eq. 4), as written and algebraically fused; the classification head
    loss.py       the losses of HF's heads (segmentation, classification) with their gradients

The components take an `ops` argument, the namespace their building blocks come from: `layers` (plain NumPy, float32
or float64) or `kernels` (numba, float32). `BACKENDS` names them as `Segformer(..., backend=...)` does.
"""

from . import kernels, layers

BACKENDS = {"numpy": layers, "numba": kernels}
