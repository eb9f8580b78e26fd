"""Optimisation as SegFormer was trained: AdamW, NVlabs' parameter groups, mmcv's poly schedule with linear warmup.

    settings, schedule = AdamW(lr=6e-5), PolySchedule(max_iters=160_000)      # NVlabs' B0-ADE values: the defaults
    params = {k: v for k, v in model.state_dict().items() if is_parameter(k)}   # the model's own arrays
    state = init_state(params)
    for step in range(schedule.max_iters):
        loss, grads = value_and_grad(model, x, labels)
        adamw_step(params, grads, state, settings, schedule)                   # updates the arrays in place

Every number comes from a source that can be read: the update is torch.optim.AdamW's (torch/optim/adam.py,
`_single_tensor_adam` with decoupled weight decay, the path torch takes for CPU tensors); the groups are those
mmcv's DefaultOptimizerConstructor builds from NVlabs' `paramwise_cfg` (local_configs/segformer/B0/
segformer.b0.512x512.ade.160k.py); the learning rate is mmcv's PolyLrUpdaterHook with linear warmup
(mmcv/runner/hooks/lr_updater.py). The optimiser's state is plain NumPy arrays keyed by the parameters' Hub names
(`state_arrays` / `load_state`), so a run can be saved to safetensors and resumed exactly.

`model.state_dict()` hands out the model's own arrays, so the updates reach the model; `value_and_grad` and
`save_pretrained` read them as they are. The fused decode head of `model(x)` (decoder="fused") is folded from the
weights when the model is built: for inference after training, build it again from `model.state_dict()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import CheckpointError, SegformerError

# NVlabs' paramwise_cfg: a parameter whose name contains a key takes that key's multipliers (mmcv matches the
# longest key first, then alphabetically). On the Hub names, "head" is the decode head (decode_head.*, its BatchNorm
# included: mmcv gives it lr x10 and weight decay, as NVlabs' `decode_head.linear_fuse.bn` got), "norm" every
# LayerNorm of the encoder (`layer_norm`, `layer_norm_1/2`, `attention.self.layer_norm`): no weight decay.
# SegFormer has no `pos_block` (a PVTv2 relic), kept so the table reads as NVlabs wrote it.
NVLABS_CUSTOM_KEYS = {"pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}}


def _check(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise SegformerError(f"{name} must be a number in {span}, got {value!r}")


@dataclass(frozen=True)
class AdamW:
    """AdamW's hyper-parameters (torch.optim.AdamW's names) and the parameter-wise multipliers (mmcv's
    `custom_keys`: {substring: {"lr_mult": m, "decay_mult": d}}). Defaults: NVlabs' SegFormer-B0 on ADE20K."""

    lr: float = 6e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    custom_keys: dict = field(default_factory=lambda: dict(NVLABS_CUSTOM_KEYS))

    def __post_init__(self):
        _check("lr", self.lr, 0.0, math.inf, high_open=True)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise SegformerError(f"betas must be two numbers (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            _check(f"betas[{i}]", b, 0.0, 1.0, high_open=True)
        _check("eps", self.eps, 0.0, math.inf, low_open=True, high_open=True)
        _check("weight_decay", self.weight_decay, 0.0, math.inf, high_open=True)
        for key, mults in self.custom_keys.items():
            if not (isinstance(key, str) and isinstance(mults, dict) and set(mults) <= {"lr_mult", "decay_mult"}):
                raise SegformerError(f"custom_keys maps a name substring to {{'lr_mult': m, 'decay_mult': d}}, got "
                                     f"{key!r}: {mults!r}")
            for name, m in mults.items():
                _check(f"custom_keys[{key!r}][{name!r}]", m, 0.0, math.inf, high_open=True)


@dataclass(frozen=True)
class PolySchedule:
    """mmcv's `policy='poly'` with `warmup='linear'`, counted in iterations. Defaults: NVlabs' 160k schedule."""

    max_iters: int = 160_000
    power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 1500  # 0: no warmup
    warmup_ratio: float = 1e-6  # the warmup starts at this fraction of the learning rate

    def __post_init__(self):
        if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise SegformerError(f"max_iters must be a positive integer, got {self.max_iters!r}")
        if isinstance(self.warmup_iters, bool) or not isinstance(self.warmup_iters, int) or self.warmup_iters < 0:
            raise SegformerError(f"warmup_iters must be an integer >= 0, got {self.warmup_iters!r}")
        _check("power", self.power, 0.0, math.inf, high_open=True)
        _check("min_lr", self.min_lr, 0.0, math.inf, high_open=True)
        _check("warmup_ratio", self.warmup_ratio, 0.0, 1.0, low_open=True)  # mmcv asserts 0 < ratio <= 1


def learning_rate(step: int, base_lr: float, schedule: PolySchedule) -> float:
    """The learning rate of iteration `step` (0-based: the number of updates made before it) for a parameter group
    whose initial rate is `base_lr`, as mmcv sets it before that iteration:

        regular = (base_lr - min_lr) * (1 - step / max_iters) ** power + min_lr          PolyLrUpdaterHook.get_lr
        step < warmup_iters:  regular * (1 - (1 - step / warmup_iters) * (1 - warmup_ratio))     get_warmup_lr
    """
    s = schedule
    if not 0 <= step <= s.max_iters:
        raise SegformerError(f"step {step} is outside the schedule's 0..{s.max_iters} iterations")
    regular = (base_lr - s.min_lr) * (1 - step / s.max_iters) ** s.power + s.min_lr
    if step < s.warmup_iters:
        k = (1 - step / s.warmup_iters) * (1 - s.warmup_ratio)
        return regular * (1 - k)
    return regular


def param_groups(names, custom_keys: dict) -> dict[str, tuple[float, float]]:
    """(lr_mult, decay_mult) of each parameter name, by mmcv's DefaultOptimizerConstructor.add_params: the keys
    sorted alphabetically, then by length, longest first; the first key that is a substring of the name decides;
    no key: (1, 1) (NVlabs sets none of mmcv's bias_*/norm_*/dwconv_* multipliers)."""
    keys = sorted(sorted(custom_keys), key=len, reverse=True)
    groups = {}
    for name in names:
        key = next((k for k in keys if k in name), None)
        mults = custom_keys[key] if key is not None else {}
        groups[name] = (float(mults.get("lr_mult", 1.0)), float(mults.get("decay_mult", 1.0)))
    return groups


@dataclass
class AdamWState:
    """torch.optim.AdamW's state: the number of updates made and, per parameter (Hub name), the running means of
    the gradient (exp_avg) and of its square (exp_avg_sq), each of the parameter's shape and dtype."""

    step: int
    exp_avg: dict[str, np.ndarray]
    exp_avg_sq: dict[str, np.ndarray]


def init_state(params: dict[str, np.ndarray]) -> AdamWState:
    """Zeros for every parameter, as torch creates them at the first step."""
    return AdamWState(0, {k: np.zeros_like(v) for k, v in params.items()},
                      {k: np.zeros_like(v) for k, v in params.items()})


def adamw_update(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, lr: float,
                 weight_decay: float, betas: tuple[float, float], eps: float) -> None:
    """One AdamW update of parameter `p` with gradient `g`, in place (`p`, `m`, `v`); `step` counts this update
    (1 for the first). torch's `_single_tensor_adam` with decoupled weight decay, operation for operation, the
    Python-float scalars rounded to the arrays' dtype as torch rounds them:

        p *= 1 - lr * weight_decay                    decoupled weight decay (before the moments)
        m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
        p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)    eps outside the square root
    """
    f = p.dtype.type
    beta1, beta2 = betas
    if weight_decay != 0:
        p *= f(1 - lr * weight_decay)
    w = 1 - beta1
    if w < 0.5:  # torch's lerp: the formula it picks for a weight below 0.5, and the one above
        m += f(w) * (g - m)
    else:
        m[...] = g - (g - m) * f(1 - w)
    v *= f(beta2)
    v += f(1 - beta2) * g * g
    step_size = lr / (1 - beta1**step)
    denom = np.sqrt(v) / f((1 - beta2**step) ** 0.5) + f(eps)
    p -= f(step_size) * (m / denom)


def adamw_step(params: dict[str, np.ndarray], grads: dict[str, np.ndarray], state: AdamWState, settings: AdamW,
               schedule: PolySchedule) -> float:
    """Update every parameter in `params` (Hub name -> array, changed in place) with its gradient in `grads`;
    `state.step` goes up by one. Each parameter's learning rate is `learning_rate(state.step, settings.lr x its
    lr_mult, schedule)`, its weight decay `settings.weight_decay x its decay_mult` (`param_groups`). Returns the
    base learning rate of this step (lr_mult 1), the one a progress line shows."""
    if set(grads) != set(params) or set(params) != set(state.exp_avg):
        odd = sorted(set(grads) ^ set(params) | set(params) ^ set(state.exp_avg))
        raise SegformerError(f"parameters, gradients and optimiser state name different tensors: {odd[:5]}")
    bad = [k for k, g in grads.items() if not np.isfinite(g).all()]
    if bad:  # checked before any update: a diverged step leaves the weights as they were
        raise SegformerError(f"the gradients of {len(bad)} parameters hold NaN or inf ({', '.join(bad[:3])}): the "
                             "loss diverged; lower the learning rate or check the labels and images")
    step = state.step
    for name, (lr_mult, decay_mult) in param_groups(params, settings.custom_keys).items():
        lr = learning_rate(step, settings.lr * lr_mult, schedule)
        adamw_update(params[name], grads[name].astype(params[name].dtype, copy=False), state.exp_avg[name],
                     state.exp_avg_sq[name], step + 1, lr, settings.weight_decay * decay_mult, settings.betas,
                     settings.eps)
    state.step = step + 1
    return learning_rate(step, settings.lr, schedule)


def state_arrays(state: AdamWState) -> dict[str, np.ndarray]:
    """The state as flat arrays for safetensors or np.savez: `step`, `exp_avg.<Hub name>`, `exp_avg_sq.<Hub name>`."""
    arrays = {"step": np.array(state.step, dtype=np.int64)}
    arrays.update({f"exp_avg.{k}": v for k, v in state.exp_avg.items()})
    arrays.update({f"exp_avg_sq.{k}": v for k, v in state.exp_avg_sq.items()})
    return arrays


def load_state(arrays: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> AdamWState:
    """`state_arrays` read back, checked against the parameters it will update: one CheckpointError names every
    tensor missing, unexpected or of another shape (the state of another model), or a missing or invalid step."""
    step = arrays.get("step")
    if step is None or np.shape(step) != () or not np.issubdtype(np.asarray(step).dtype, np.integer) or step < 0:
        raise CheckpointError(f"the optimiser state needs a step count (an integer >= 0), got {step!r}")
    want = {f"{kind}.{k}": v.shape for kind in ("exp_avg", "exp_avg_sq") for k, v in params.items()}
    have = {k: np.shape(v) for k, v in arrays.items() if k != "step"}
    problems = sorted(set(want) - set(have))[:3] + sorted(set(have) - set(want))[:3] + sorted(
        f"{k}: {have[k]}, the model's is {want[k]}" for k in set(want) & set(have) if have[k] != want[k])[:3]
    if problems:
        raise CheckpointError("the optimiser state does not belong to this model (missing, unexpected or mis-shaped "
                              f"tensors: {', '.join(problems)}); resume with the model it was saved with")
    dtype = {k: v.dtype for k, v in params.items()}
    return AdamWState(int(step),
                      {k: np.array(arrays[f"exp_avg.{k}"], dtype=dtype[k]) for k in params},
                      {k: np.array(arrays[f"exp_avg_sq.{k}"], dtype=dtype[k]) for k in params})
