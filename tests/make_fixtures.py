#!/usr/bin/env python
"""Dev-only: write the reference outputs of Hugging Face transformers that tests/test_parity.py compares against.

    python tests/make_fixtures.py            # all cases
    python tests/make_fixtures.py a d        # only some (see CASES at the bottom)

Needs torch and transformers (the tests never import either). The weights reach transformers the way they reach
mininp_segformer: `mininp_segformer.weights.random_state_dict(config, head, seed, stats)` makes them (deterministic
NumPy), `save_checkpoint` writes a Hub-layout directory (config.json + model.safetensors), and transformers'
`from_pretrained` loads it -- which must report no missing, unexpected or mismatched key, and every parameter must
then equal our tensor bit for bit (so our on-disk key names are the real ones). Models run in float32, eval mode,
with attn_implementation="eager" so that attentions are returned. Images go through `SegformerImageProcessorPil`
(the PIL backend, i.e. the classic "slow" processor), never the torchvision one.

The photos in ../shared/images/ are read, never stored: of their pixel_values only 4096 sampled values and the
per-channel mean/std are kept. Each .npz holds a JSON "meta" entry (config, weight seed and digest, input seed and
digest, versions); tests/fixtures/VERSIONS.json lists the versions and every file.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package and tests/ of this checkout

from mininp_segformer.config import SegformerConfig, variant_config  # noqa: E402
from mininp_segformer.weights import (BACKBONE, CLASSIFICATION, SEMANTIC, is_parameter,  # noqa: E402
                                      random_state_dict, read_safetensors, save_checkpoint, to_hub_name,
                                      to_transformers5_name)
from tests.conftest import (FIXTURES_DIR, PHOTOS, SHARED_DIR, WEIGHT_STATS_FIXTURE, array_digest,  # noqa: E402
                            N_GRAD_SAMPLES, grad_sample_index, load_weight_stats, perturbed_ade_prediction,
                            random_labels, random_logits, random_pixel_values, random_segmentation_pair,
                            smooth_image, state_digest)

import PIL  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (SegformerForImageClassification, SegformerForSemanticSegmentation,  # noqa: E402
                          SegformerImageProcessorPil, SegformerModel)
from transformers.image_utils import load_image as hf_load_image  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; every case is small
torch.manual_seed(0)  # nothing random should run in torch, but make sure

ADE_DIR = SHARED_DIR / "configs" / "segformer-b0-finetuned-ade-512-512"
STATS_JSON = SHARED_DIR / "reference" / "segformer-b0-ade_weight_stats.json"
EXPECTED_JSON = SHARED_DIR / "reference" / "segformer_expected_logits.json"
IMAGES_DIR = SHARED_DIR / "images"
N_PIXEL_SAMPLES = 4096
SIZE_BUDGET = 50_000_000  # bytes, all files in tests/fixtures

HF_CLASS = {SEMANTIC: SegformerForSemanticSegmentation, CLASSIFICATION: SegformerForImageClassification,
            BACKBONE: SegformerModel}

VERSIONS = {
    "python": platform.python_version(),
    "numpy": np.__version__,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "pillow": PIL.__version__,
}

written: dict[str, dict] = {}


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def log(msg):
    print(msg, flush=True)


def ade_config() -> SegformerConfig:
    """The real nvidia/segformer-b0-finetuned-ade-512-512 config.json (150 ADE20K labels)."""
    return SegformerConfig.from_json(ADE_DIR / "config.json")


def pil_processor(from_real_config: bool = True) -> SegformerImageProcessorPil:
    """transformers' PIL-backend SegFormer processor; fails unless that is really the class and backend we got."""
    if from_real_config:
        proc = SegformerImageProcessorPil.from_pretrained(ADE_DIR)
    else:
        proc = SegformerImageProcessorPil()
    if type(proc).__name__ != "SegformerImageProcessorPil" or getattr(proc, "backend", None) != "pil":
        raise SystemExit(f"expected SegformerImageProcessorPil with backend 'pil', got {type(proc)!r} "
                         f"(backend {getattr(proc, 'backend', None)!r})")
    return proc


def processor_info(proc) -> dict:
    return {"class": f"{type(proc).__module__}.{type(proc).__name__}", "backend": proc.backend,
            "size": dict(proc.size), "resample": int(proc.resample), "rescale_factor": proc.rescale_factor,
            "image_mean": list(proc.image_mean), "image_std": list(proc.image_std)}


@contextmanager
def hf_model(config: SegformerConfig, head: str, state: dict):
    """Write `state` with our save_checkpoint and load it with transformers' from_pretrained, strictly."""
    cls = HF_CLASS[head]
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, config, state)
        # 1. what save_checkpoint wrote is exactly the state (names, shapes, dtypes)
        on_disk = {k: v.shape for k, v in read_safetensors(Path(tmp) / "model.safetensors").items()}
        wanted = {k: tuple(v.shape) for k, v in state.items()}
        if on_disk != wanted:
            diff = sorted(f"{k}: disk {on_disk.get(k)} vs state {wanted.get(k)}"
                          for k in set(on_disk) | set(wanted) if on_disk.get(k) != wanted.get(k))
            raise SystemExit("save_checkpoint wrote tensors that differ from the state dict:\n  " + "\n  ".join(diff))
        # 2. transformers loads it without any missing / unexpected / mismatched key
        model, info = cls.from_pretrained(tmp, output_loading_info=True, attn_implementation="eager",
                                          dtype=torch.float32)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise SystemExit(f"{cls.__name__}.from_pretrained reported problems with our checkpoint: {problems}")
        model.eval()
        if model.config._attn_implementation != "eager":
            raise SystemExit(f"attn_implementation is {model.config._attn_implementation}, not eager")
        # 3. every parameter/buffer equals our tensor bit for bit, and every one is covered
        hf_state = model.state_dict()
        seen = set()
        for k, v in state.items():
            if k.endswith("num_batches_tracked"):
                continue
            name = to_transformers5_name(k)
            if name not in hf_state:
                raise SystemExit(f"our key {k} maps to {name}, which {cls.__name__} does not have")
            if not torch.equal(hf_state[name], torch.from_numpy(np.ascontiguousarray(v))):
                raise SystemExit(f"{cls.__name__}: parameter {name} (from {k}) differs from our tensor after loading")
            seen.add(name)
        rest = sorted(k for k in hf_state if k not in seen and not k.endswith("num_batches_tracked"))
        if rest:
            raise SystemExit(f"{cls.__name__} has tensors our checkpoint did not set: {rest}")
        assert model.config.num_labels == config.num_labels
        yield model


def run(model, pixel_values: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(pixel_values)), output_hidden_states=True,
                     output_attentions=True)


def np32(t) -> np.ndarray:
    a = t.detach().cpu().numpy()
    assert a.dtype == np.float32, a.dtype
    return np.ascontiguousarray(a)


def label_map(t, num_labels: int) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a.astype(np.uint8 if num_labels <= 256 else np.int16)


def weights_meta(config, head, seed, stats_name=None, state=None) -> dict:
    return {"head": head, "seed": seed, "stats": stats_name,
            "sha256": state_digest(state), "made_by": "mininp_segformer.weights.random_state_dict"}


def save(name: str, arrays: dict, meta: dict) -> None:
    meta = dict(meta, versions=VERSIONS, generated_by="tests/make_fixtures.py")
    path = FIXTURES_DIR / f"{name}.npz"
    np.savez_compressed(path, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    size = path.stat().st_size
    written[path.name] = {"bytes": size, "case": meta.get("case"), "tensors": sorted(arrays)}
    log(f"  wrote {path.relative_to(ROOT)}: {size / 1e6:.2f} MB, {len(arrays)} arrays")


def outputs_of(out, prefix="") -> dict:
    """hidden_state_i and attention_j (stage-major, all layers) of an HF output."""
    arrays = {}
    for i, h in enumerate(out.hidden_states):
        arrays[f"{prefix}hidden_state_{i}"] = np32(h)
    for j, a in enumerate(out.attentions):
        arrays[f"{prefix}attention_{j}"] = np32(a)
    return arrays


# ----------------------------------------------------------------------------------------------------------------
# a. B0 with the real ADE config and weights drawn from the real statistics, on the three photos
# ----------------------------------------------------------------------------------------------------------------

SEED_A = 20240
SEED_A_SAMPLES = 4096


def write_weight_stats() -> dict:
    src = json.loads(STATS_JSON.read_text(encoding="utf-8"))
    tensors = {k: {"mean": v["mean"], "std": v["std"]} for k, v in sorted(src["tensors"].items())}
    out = {
        "description": "Per-tensor mean and std (3 decimals) of the real nvidia/segformer-b0-finetuned-ade-512-512 "
                       "weights, by Hub key. The parity tests draw synthetic B0 weights from them "
                       "(mininp_segformer.weights.random_state_dict(..., stats=tensors)). Statistics only, no weights.",
        "source": "../shared/reference/segformer-b0-ade_weight_stats.json (sha256 "
                  f"{hashlib.sha256(STATS_JSON.read_bytes()).hexdigest()}), which took them from "
                  "github shanjiang7/GraphNet@3cc751f864f2e9fdd98f4b2b74a9125267ca2cb2 samples/transformers-auto-model/"
                  "segformer-b0-finetuned-ade-512-512/weight_meta.py (MIT License); shape and dtype dropped",
        "tensors": tensors,
    }
    (FIXTURES_DIR / WEIGHT_STATS_FIXTURE).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    written[WEIGHT_STATS_FIXTURE] = {"bytes": (FIXTURES_DIR / WEIGHT_STATS_FIXTURE).stat().st_size,
                                     "case": "a (weight statistics)"}
    return tensors


def case_a_photos():
    """B0-ADE config, weights ~ real per-tensor stats; the 3 photos through HF's PIL processor, model, postprocess."""
    stats = write_weight_stats()
    config = ade_config()
    state = random_state_dict(config, SEMANTIC, seed=SEED_A, stats=stats)
    missing = sorted(k for k in state if k not in stats and not k.endswith("num_batches_tracked"))
    if missing:
        raise SystemExit(f"the weight statistics do not cover {missing}")
    proc = pil_processor()
    with hf_model(config, SEMANTIC, state) as model:
        for tag, filename in PHOTOS.items():
            path = IMAGES_DIR / filename
            image = hf_load_image(str(path))  # what HF pipelines do: EXIF transpose, convert("RGB")
            width, height = image.size
            pixel_values = proc(images=image, return_tensors="pt")["pixel_values"]
            pv = np32(pixel_values)
            out = run(model, pv)
            seg = proc.post_process_semantic_segmentation(out, target_sizes=[(height, width)])[0]
            flat = np.random.default_rng(SEED_A_SAMPLES).choice(pv.size, size=N_PIXEL_SAMPLES, replace=False)
            positions = np.stack(np.unravel_index(np.sort(flat), pv.shape), axis=1).astype(np.int32)  # (n, 4)
            arrays = {
                "pixel_values_positions": positions,
                "pixel_values_samples": pv[tuple(positions.T)],
                "pixel_values_channel_mean": pv.astype(np.float64).mean(axis=(0, 2, 3)),
                "pixel_values_channel_std": pv.astype(np.float64).std(axis=(0, 2, 3)),
                "segmentation": label_map(seg, config.num_labels),
            }
            hs = [np32(h) for h in out.hidden_states]
            logits = np32(out.logits)
            if tag == "coco":
                arrays.update({f"hidden_state_{i}": h for i, h in enumerate(hs)})
                arrays["logits"] = logits
                last = sum(config.depths) - 1  # the last layer's attention only (2 MB each; size budget)
                arrays[f"attention_{last}"] = np32(out.attentions[last])
            else:
                arrays["logits_sub4"] = np.ascontiguousarray(logits[..., ::4, ::4])
                arrays["hidden_state_3"] = hs[-1]
            meta = {
                "case": "a", "photo": f"../shared/images/{filename}", "photo_size_hw": [height, width],
                "photo_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "config": config.to_dict(), "weights": weights_meta(config, SEMANTIC, SEED_A,
                                                                     WEIGHT_STATS_FIXTURE, state),
                "processor": processor_info(proc), "pixel_values_shape": list(pv.shape),
                "logits_shape": list(logits.shape), "num_attentions": len(out.attentions),
                "sample_seed": SEED_A_SAMPLES,
                "note": "pixel_values_positions are (b, c, y, x) indices into pixel_values; the photo itself and "
                        "its full pixel_values are not stored",
            }
            save(f"a_b0_ade_{tag}", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# b. B0-ADE, batch 2, random-normal pixel_values of odd size 97 x 211: every tensor
# ----------------------------------------------------------------------------------------------------------------

SEED_B_WEIGHTS, SEED_B_INPUT = 1001, 1002
SHAPE_B = (2, 3, 97, 211)


def case_b_batch_odd():
    """B0-ADE, batch 2, random pixel_values 97 x 211: all hidden states, all attentions, logits."""
    config = ade_config()
    state = random_state_dict(config, SEMANTIC, seed=SEED_B_WEIGHTS)
    x = random_pixel_values(SEED_B_INPUT, SHAPE_B)
    with hf_model(config, SEMANTIC, state) as model:
        out = run(model, x)
    arrays = outputs_of(out)
    arrays["logits"] = np32(out.logits)
    meta = {"case": "b", "config": config.to_dict(),
            "weights": weights_meta(config, SEMANTIC, SEED_B_WEIGHTS, state=state),
            "input": {"seed": SEED_B_INPUT, "shape": list(SHAPE_B), "made_by": "random_pixel_values"},
            "input_sha256": array_digest(x), "num_attentions": len(out.attentions)}
    save("b_b0_ade_batch2_97x211", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# c. B0 with 7 labels at 512 x 683
# ----------------------------------------------------------------------------------------------------------------

SEED_C_WEIGHTS, SEED_C_INPUT = 2001, 2002
SHAPE_C = (1, 3, 512, 683)


def case_c_7_labels():
    """B0 with 7 labels at 512 x 683: logits and the last two hidden states."""
    config = variant_config("b0", num_labels=7)
    state = random_state_dict(config, SEMANTIC, seed=SEED_C_WEIGHTS)
    x = random_pixel_values(SEED_C_INPUT, SHAPE_C)
    with hf_model(config, SEMANTIC, state) as model:
        out = run(model, x)
    arrays = {"logits": np32(out.logits), "hidden_state_2": np32(out.hidden_states[2]),
              "hidden_state_3": np32(out.hidden_states[3])}
    meta = {"case": "c", "config": config.to_dict(),
            "weights": weights_meta(config, SEMANTIC, SEED_C_WEIGHTS, state=state),
            "input": {"seed": SEED_C_INPUT, "shape": list(SHAPE_C), "made_by": "random_pixel_values"},
            "input_sha256": array_digest(x)}
    save("c_b0_7labels_512x683", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# d. MiT-b1..b5 with 19 labels on a small odd input
# ----------------------------------------------------------------------------------------------------------------

SHAPE_D = (1, 3, 65, 77)
VARIANT_SEEDS = {"b1": 3001, "b2": 3002, "b3": 3003, "b4": 3004, "b5": 3005}


def case_d_variants():
    """MiT-b1..b5, 19 labels, 65 x 77: hidden states, attentions of every layer, logits."""
    for name, seed in VARIANT_SEEDS.items():
        config = variant_config(name, num_labels=19)
        state = random_state_dict(config, SEMANTIC, seed=seed)
        x = random_pixel_values(seed + 100, SHAPE_D)
        with hf_model(config, SEMANTIC, state) as model:
            out = run(model, x)
        arrays = outputs_of(out)
        arrays["logits"] = np32(out.logits)
        meta = {"case": "d", "variant": name, "config": config.to_dict(),
                "weights": weights_meta(config, SEMANTIC, seed, state=state),
                "input": {"seed": seed + 100, "shape": list(SHAPE_D), "made_by": "random_pixel_values"},
                "input_sha256": array_digest(x), "num_attentions": len(out.attentions)}
        del state
        save(f"d_{name}_19labels_65x77", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# e. Classification head (reshape_last_stage True / False) and the bare backbone
# ----------------------------------------------------------------------------------------------------------------

SEED_E_WEIGHTS, SEED_E_INPUT = 4001, 4002
SEED_E_BACKBONE = 4003
SHAPE_E = (2, 3, 75, 90)


def case_e_classification_backbone():
    """SegformerForImageClassification (reshape_last_stage True/False) and SegformerModel."""
    x = random_pixel_values(SEED_E_INPUT, SHAPE_E)
    arrays, metas = {}, {}
    for reshape in (True, False):
        config = variant_config("b0", num_labels=10, architectures=(CLASSIFICATION,), reshape_last_stage=reshape)
        state = random_state_dict(config, CLASSIFICATION, seed=SEED_E_WEIGHTS)
        with hf_model(config, CLASSIFICATION, state) as model:
            out = run(model, x)
        tag = f"reshape_{str(reshape).lower()}"
        arrays = {"logits": np32(out.logits), **{k: v for k, v in outputs_of(out).items() if "hidden" in k}}
        meta = {"case": "e", "head": CLASSIFICATION, "reshape_last_stage": reshape, "config": config.to_dict(),
                "weights": weights_meta(config, CLASSIFICATION, SEED_E_WEIGHTS, state=state),
                "input": {"seed": SEED_E_INPUT, "shape": list(SHAPE_E), "made_by": "random_pixel_values"},
                "input_sha256": array_digest(x),
                "hidden_state_shapes": [list(h.shape) for h in out.hidden_states]}
        save(f"e_classification_b0_{tag}", arrays, meta)

    config = variant_config("b0", num_labels=10)
    state = random_state_dict(config, BACKBONE, seed=SEED_E_BACKBONE)
    with hf_model(config, BACKBONE, state) as model:
        out = run(model, x)
    arrays = {"last_hidden_state": np32(out.last_hidden_state)}
    meta = {"case": "e", "head": BACKBONE, "config": config.to_dict(),
            "weights": weights_meta(config, BACKBONE, SEED_E_BACKBONE, state=state),
            "input": {"seed": SEED_E_INPUT, "shape": list(SHAPE_E), "made_by": "random_pixel_values"},
            "input_sha256": array_digest(x)}
    save("e_backbone_b0", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# f. The image processor alone, on synthetic uint8 images (full pixel_values)
# ----------------------------------------------------------------------------------------------------------------

PREPROCESS_CASES = [
    # name, [(seed, height, width, as PIL?)], size passed to HF (None = its default 512 x 512), our size argument
    ("up_37x53_default", [(5001, 37, 53, False)], None, None),
    ("down_300x451_to_128x96", [(5002, 300, 451, False)], {"height": 128, "width": 96}, [128, 96]),
    ("list_pil_and_array_to_64", [(5001, 37, 53, True), (5002, 300, 451, False)], {"height": 64, "width": 64}, 64),
]


def case_f_preprocess():
    """SegformerImageProcessorPil on synthetic uint8 images: full pixel_values."""
    from PIL import Image

    proc = pil_processor(from_real_config=False)
    real = processor_info(pil_processor(from_real_config=True))
    if {k: v for k, v in processor_info(proc).items()} != real:
        raise SystemExit(f"SegformerImageProcessorPil() defaults {processor_info(proc)} differ from the real "
                         f"preprocessor_config.json {real}")
    arrays, cases = {}, []
    for name, images, hf_size, our_size in PREPROCESS_CASES:
        inputs, digests = [], []
        for seed, h, w, as_pil in images:
            img = smooth_image(seed, h, w)
            digests.append(array_digest(img))
            inputs.append(Image.fromarray(img, mode="RGB") if as_pil else img)
        kwargs = {} if hf_size is None else {"size": hf_size}
        pv = proc(images=inputs if len(inputs) > 1 else inputs[0], return_tensors="np", **kwargs)["pixel_values"]
        arrays[name] = np.asarray(pv, dtype=np.float32)
        if arrays[name].dtype != pv.dtype:
            raise SystemExit(f"HF pixel_values dtype {pv.dtype}")
        cases.append({"name": name, "images": [{"seed": s, "height": h, "width": w, "as_pil": p}
                                               for s, h, w, p in images],
                      "image_sha256": digests, "hf_size": hf_size, "our_size": our_size,
                      "shape": list(pv.shape)})
    meta = {"case": "f", "processor": processor_info(proc), "cases": cases, "image_maker": "smooth_image",
            "note": "photo preprocessing parity uses the sampled pixel_values in a_b0_ade_*.npz"}
    save("f_preprocess", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# g. Bilinear resize alone (torch.nn.functional.interpolate, align_corners=False)
# ----------------------------------------------------------------------------------------------------------------

RESIZE_CASES = [
    # name, seed, input shape (B, C, H, W), output (H, W)
    ("up_x4", 6001, (1, 2, 8, 10), (32, 40)),
    ("up_noninteger", 6002, (2, 3, 25, 53), (97, 211)),
    ("down_x2", 6003, (1, 3, 64, 48), (32, 24)),
    ("down_noninteger", 6004, (2, 2, 97, 211), (25, 53)),
    ("mixed_down_up", 6005, (1, 4, 30, 20), (11, 77)),
    ("logits_like_32_to_120x160", 6006, (1, 2, 32, 32), (120, 160)),
    ("identity", 6007, (1, 1, 9, 7), (9, 7)),
    ("from_one_pixel_row", 6008, (1, 2, 1, 5), (4, 3)),
    ("to_one_pixel", 6009, (1, 2, 6, 5), (1, 1)),
]


def case_g_resize():
    """torch.nn.functional.interpolate(bilinear, align_corners=False) on random tensors."""
    arrays, cases = {}, []
    for name, seed, shape, size in RESIZE_CASES:
        x = random_pixel_values(seed, shape)
        y = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False)
        arrays[name] = np32(y)
        cases.append({"name": name, "seed": seed, "shape": list(shape), "size": list(size),
                      "input_sha256": array_digest(x)})
    meta = {"case": "g", "cases": cases, "input_maker": "random_pixel_values",
            "reference": "torch.nn.functional.interpolate(x, size, mode='bilinear', align_corners=False)"}
    save("g_resize", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# h. post_process_semantic_segmentation on random logits
# ----------------------------------------------------------------------------------------------------------------

POSTPROCESS_CASES = [
    # name, seed, logits shape, target sizes (None: no resize)
    ("batch2_up_and_down", 7001, (2, 5, 13, 17), [(50, 61), (7, 9)]),
    ("ade_like_150_to_100x130", 7002, (1, 150, 32, 32), [(100, 130)]),
    ("no_target_sizes", 7003, (2, 19, 11, 14), None),
]


def case_h_postprocess():
    """post_process_semantic_segmentation on random logits."""
    proc = pil_processor(from_real_config=False)
    arrays, cases = {}, []
    for name, seed, shape, sizes in POSTPROCESS_CASES:
        logits = random_logits(seed, shape)
        maps = proc.post_process_semantic_segmentation(SimpleNamespace(logits=torch.from_numpy(logits)),
                                                       target_sizes=sizes)
        for i, m in enumerate(maps):
            arrays[f"{name}__{i}"] = m.numpy().astype(np.int16)
        cases.append({"name": name, "seed": seed, "shape": list(shape),
                      "target_sizes": None if sizes is None else [list(s) for s in sizes],
                      "input_sha256": array_digest(logits)})
    meta = {"case": "h", "cases": cases, "input_maker": "random_logits", "processor": processor_info(proc)}
    save("h_postprocess", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# i. The expected logits slice of the real checkpoint (from transformers' integration test)
# ----------------------------------------------------------------------------------------------------------------

def case_i_expected_slice():
    """The real B0-ADE logits slice of transformers' integration test, copied with its source."""
    src = json.loads(EXPECTED_JSON.read_text(encoding="utf-8"))
    case = next(c for c in src["cases"] if c["model"] == "nvidia/segformer-b0-finetuned-ade-512-512")
    out = {
        "description": "logits[0, :3, :3, :3] of nvidia/segformer-b0-finetuned-ade-512-512 on "
                       "../shared/images/coco_000000039769.png preprocessed by SegformerImageProcessor defaults "
                       "(512 x 512 PIL bilinear, 1/255, ImageNet mean/std), as transformers' integration test "
                       "expects them (atol 1e-4).",
        "source": src["source"] + "; copied from ../shared/reference/segformer_expected_logits.json (sha256 "
                  f"{hashlib.sha256(EXPECTED_JSON.read_bytes()).hexdigest()})",
        "licence": "Apache-2.0 (transformers' test file)",
        "model": case["model"], "image": case["image"], "logits_shape": case["logits_shape"],
        "atol": case["atol_used_by_test"], "logits_0_:3_:3_:3": case["logits_0_:3_:3_:3"],
    }
    path = FIXTURES_DIR / "expected_logits_b0_ade.json"
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    written[path.name] = {"bytes": path.stat().st_size, "case": "i"}


# ----------------------------------------------------------------------------------------------------------------
# j. Segmentation metrics: mean IoU & co. by an independent torch implementation (mmseg's intersect_and_union)
# ----------------------------------------------------------------------------------------------------------------

METRIC_PAIRS_J = [(8001, 37, 53), (8002, 64, 64), (8003, 17, 120)]  # (seed, height, width) of random pairs
NUM_LABELS_J = 8
SEED_J_ADE = 8100
ADE_ANNOTATION = "ADE_train_00000001_seg.png"


def torch_intersect_and_union(pred, label, num_labels, ignore_index=255, reduce_zero_label=False):
    """mmseg's intersect_and_union (mmseg/core/evaluation/metrics.py), written here in torch: areas via histc."""
    pred = torch.from_numpy(np.asarray(pred).astype(np.int64))
    label = torch.from_numpy(np.asarray(label).astype(np.int64))
    if reduce_zero_label:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]
    hist = lambda x: torch.histc(x.float(), bins=num_labels, min=0, max=num_labels - 1)  # noqa: E731
    area_intersect, area_pred, area_label = hist(intersect), hist(pred), hist(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def torch_metrics(pairs, num_labels, ignore_index=255, reduce_zero_label=False) -> dict:
    """mmseg's total_intersect_and_union + eval_metrics / HF's mean_iou, in float64 torch: sums over the set."""
    totals = [torch.zeros(num_labels, dtype=torch.float64) for _ in range(4)]
    for pred, label in pairs:
        for t, a in zip(totals, torch_intersect_and_union(pred, label, num_labels, ignore_index, reduce_zero_label)):
            t += a.double()
    inter, union, pred_area, label_area = totals
    iou, acc = inter / union, inter / label_area
    return {"area_intersect": inter.numpy(), "area_union": union.numpy(), "area_pred": pred_area.numpy(),
            "area_label": label_area.numpy(), "per_class_iou": iou.numpy(), "per_class_accuracy": acc.numpy(),
            "mean_iou": np.array(torch.nanmean(iou).item()), "mean_accuracy": np.array(torch.nanmean(acc).item()),
            "pixel_accuracy": np.array((inter.sum() / label_area.sum()).item())}


def case_j_metrics():
    """Mean IoU, per-class IoU/accuracy, pixel accuracy by an independent torch implementation (mmseg style)."""
    from PIL import Image

    pairs = [random_segmentation_pair(seed, h, w, NUM_LABELS_J) for seed, h, w in METRIC_PAIRS_J]
    arrays = {f"random__{k}": v for k, v in torch_metrics(pairs, NUM_LABELS_J).items()}
    path = IMAGES_DIR / ADE_ANNOTATION
    with Image.open(path) as img:
        if img.mode != "L":
            raise SystemExit(f"{path} is mode {img.mode}, expected L (ADEChallengeData2016 annotation)")
        annotation = np.asarray(img)
    pred = perturbed_ade_prediction(annotation, SEED_J_ADE)
    arrays.update({f"ade__{k}": v for k, v in torch_metrics([(pred, annotation)], 150, 255, True).items()})
    meta = {
        "case": "j",
        "random": {"pairs": [list(p) for p in METRIC_PAIRS_J], "num_labels": NUM_LABELS_J, "ignore_index": 255,
                   "made_by": "random_segmentation_pair", "input_sha256": array_digest(*[a for p in pairs for a in p])},
        "ade": {"annotation": f"../shared/images/{ADE_ANNOTATION}",
                "annotation_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "seed": SEED_J_ADE,
                "num_labels": 150, "reduce_zero_label": True, "made_by": "perturbed_ade_prediction",
                "prediction_sha256": array_digest(pred)},
        "reference": "mmseg intersect_and_union (torch.histc areas) summed over the set; IoU = I / U, acc = I / "
                     "label area, means by torch.nanmean, pixel accuracy = sum I / sum label area (float64)",
    }
    save("j_metrics", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# k. The trained demo model (weights/segformer-b0-shapes) on a held-out scene: a real model, not random weights
# ----------------------------------------------------------------------------------------------------------------

SEED_K_SCENE = 7  # one of scenes.HELD_OUT_SEEDS, never used in training


def case_k_demo_model():
    """The bundled demo model on held-out scene 7: HF processor -> model -> post-processing, all outputs."""
    from mininp_segformer.tools.scenes import make_scene

    directory = ROOT / "weights" / "segformer-b0-shapes"
    model = SegformerForSemanticSegmentation.from_pretrained(directory, attn_implementation="eager",
                                                             dtype=torch.float32).eval()  # fp16 on disk, upcast
    size = tuple(json.loads((directory / "preprocessor_config.json").read_text())["size"].values())
    image, _ = make_scene(SEED_K_SCENE, size=size)
    proc = SegformerImageProcessorPil.from_pretrained(directory)
    x = proc(images=image, return_tensors="np")["pixel_values"].astype(np.float32)
    out = run(model, x)
    seg = proc.post_process_semantic_segmentation(out, target_sizes=[image.shape[:2]])[0]
    arrays = outputs_of(out)
    arrays.update(logits=np32(out.logits), pixel_values=x, segmentation=label_map(seg, model.config.num_labels))
    meta = {"case": "k", "model": "weights/segformer-b0-shapes",
            "model_sha256": hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest(),
            "scene_seed": SEED_K_SCENE, "size": list(size), "num_attentions": len(out.attentions)}
    save("k_demo_model_scene7", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# l. The demo model taken apart, for the notebooks: each component's torch output on a small scene
# ----------------------------------------------------------------------------------------------------------------

SEED_L_SCENE = 7
SIZE_L = (64, 64)  # small on purpose: stage 1 has 16 x 16 tokens, so every intermediate stays a few tens of KB
SIZE_L_UNSEEN = (96, 176)  # a resolution (and aspect ratio) the demo model never saw in training


def case_l_components():
    """The demo model's intermediates (patch merging, attention, Mix-FFN, decoder) via forward hooks; GELU; resize."""
    from mininp_segformer.tools.scenes import make_scene

    directory = ROOT / "weights" / "segformer-b0-shapes"
    model = SegformerForSemanticSegmentation.from_pretrained(directory, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    # transformers 5 module names (the Hub checkpoint keys are the old ones; see weights.to_transformers5_name)
    stage, head = model.segformer.stages[0], model.decode_head
    block = stage.blocks[0]  # stage 1, layer 1
    reduction = block.attention.sequence_reduction
    taps = {  # fixture key -> module whose output is recorded (first element if it returns a tuple)
        "patch_embed_0_proj": stage.patch_embeddings.proj,                 # the 7x7 stride-4 conv
        "patch_embed_0": stage.patch_embeddings,                           # after its LayerNorm
        "block_0_0_layer_norm_1": block.layernorm_before,
        "block_0_0_sr": reduction.sequence_reduction,                      # the spatial-reduction conv
        "block_0_0_sr_layer_norm": reduction.layer_norm,
        "block_0_0_attention": block.attention,                            # after the output projection
        "block_0_0_layer_norm_2": block.layernorm_after,
        "block_0_0_dense1": block.mlp.fc1,
        "block_0_0_dwconv": block.mlp.dwconv,                              # the 3x3 depthwise conv
        "block_0_0_mlp": block.mlp,                                        # Mix-FFN output
        "block_0_0": block,                                                # the whole layer
        **{f"decode_linear_c_{i}": head.linear_projections[i] for i in range(4)},  # per-stage MLP
        "decode_fuse": head.linear_fuse,                                   # 1x1 fuse conv
        "decode_batch_norm": head.batch_norm,
    }
    recorded = {}

    def hook(name):
        def record(module, inputs, output):
            recorded[name] = np32(output[0] if isinstance(output, tuple) else output)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in taps.items()]
    proc = SegformerImageProcessorPil.from_pretrained(directory, size={"height": SIZE_L[0], "width": SIZE_L[1]})
    image, _ = make_scene(SEED_L_SCENE, size=SIZE_L)
    x = proc(images=image, return_tensors="np")["pixel_values"].astype(np.float32)
    out = run(model, x)
    for h in handles:
        h.remove()
    missing = sorted(set(taps) - set(recorded))
    if missing:
        raise SystemExit(f"hooks did not fire for {missing}")
    log("  " + ", ".join(f"{k} {v.shape}" for k, v in recorded.items()))
    arrays = dict(recorded, pixel_values=x, logits=np32(out.logits), attention_0=np32(out.attentions[0]),
                  **{f"hidden_state_{i}": np32(h) for i, h in enumerate(out.hidden_states)})

    # the same model at a size it never trained on: only the map and the stride-4 logits
    proc_unseen = SegformerImageProcessorPil.from_pretrained(
        directory, size={"height": SIZE_L_UNSEEN[0], "width": SIZE_L_UNSEEN[1]})
    image_u, _ = make_scene(SEED_L_SCENE, size=SIZE_L_UNSEEN)
    xu = proc_unseen(images=image_u, return_tensors="np")["pixel_values"].astype(np.float32)
    out_u = run(model, xu)
    seg_u = proc_unseen.post_process_semantic_segmentation(out_u, target_sizes=[SIZE_L_UNSEEN])[0]
    arrays.update(unseen_logits=np32(out_u.logits), unseen_segmentation=label_map(seg_u, model.config.num_labels))

    # GELU on a grid: exact (erf) as SegFormer uses, and the tanh approximation for comparison
    grid = np.linspace(-5.0, 5.0, 2001, dtype=np.float32)
    t = torch.from_numpy(grid)
    arrays.update(gelu_x=grid, gelu_erf=np32(torch.nn.functional.gelu(t)),
                  gelu_tanh=np32(torch.nn.functional.gelu(t, approximate="tanh")))

    # align_corners on a tiny worked example: a 2 x 3 image to 4 x 6, both conventions
    tiny = torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3)
    for flag in (False, True):
        arrays[f"resize_tiny_align_corners_{str(flag).lower()}"] = np32(
            torch.nn.functional.interpolate(tiny, size=(4, 6), mode="bilinear", align_corners=flag))
    arrays["resize_tiny_input"] = np32(tiny)

    meta = {"case": "l", "model": "weights/segformer-b0-shapes",
            "model_sha256": hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest(),
            "scene_seed": SEED_L_SCENE, "size": list(SIZE_L), "unseen_size": list(SIZE_L_UNSEEN),
            "taps": {k: f"{type(m).__name__}" for k, m in taps.items()},
            "note": "block_0_0_* are stage 1, layer 1; decode_linear_c_i is the decoder MLP of stage i (before "
                    "upsampling); outputs of modules returning tuples are their first element"}
    save("l_demo_model_components", arrays, meta)


# ----------------------------------------------------------------------------------------------------------------
# u, v, w. Gradients: torch autograd's loss.backward() through HF's models
# ----------------------------------------------------------------------------------------------------------------
# Train mode has every dropout probability and drop_path_rate set to 0, so that it is deterministic: BatchNorm then
# normalises with the batch's statistics (and updates its running ones), which is what train mode changes. torch
# runs in float64 (`model.double()`): the references are then exact to float32's storage, so that the tests measure
# our error, not torch's -- in float32 a ReLU input within rounding of 0 can fall on either side, and with ~10^5
# decode-head values one such pixel is likely, moving the BatchNorm gradients of its channel by a few 1e-3. Each
# gradient is stored under our Hub name (d pixel_values as "pixel_values"): whole, or at `grad_sample_index(size)`
# (the tests make the same indices), with the largest |gradient| of the whole tensor, which scales its tolerance.
# B0's train-mode gradients are stored whole (15 MB); b1..b5 keep N_SAMPLES_V entries a tensor (b5 has 82 M).

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
                  drop_path_rate=0.0)


def torch_value_and_grad(model, state: dict, x: np.ndarray, labels: np.ndarray, train: bool):
    """(loss, {Hub name: gradient}, d pixel_values) of HF's `model(pixel_values, labels=labels).loss.backward()`."""
    model.double().train(train)
    model.zero_grad(set_to_none=True)
    pixel_values = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    out = model(pixel_values=pixel_values, labels=torch.from_numpy(labels))
    out.loss.backward()
    params = dict(model.named_parameters())
    grads = {k: np32(params[to_transformers5_name(k)].grad.float()) for k in state if is_parameter(k)}
    if set(params) != {to_transformers5_name(k) for k in grads}:
        raise SystemExit(f"parameters without a gradient: {sorted(set(params) - set(map(to_transformers5_name, grads)))}")
    return float(out.loss), grads, np32(pixel_values.grad.float())


def gradient_arrays(grads: dict, prefix: str = "", whole: bool = False, samples: int = N_GRAD_SAMPLES) -> dict:
    """"<prefix>grads": every gradient (whole, or its `grad_sample_index` entries) flattened and concatenated in
    the order of "<prefix>names"; "<prefix>absmax": each whole tensor's largest |gradient|, in that order."""
    names = sorted(grads)
    flats = [grads[k].reshape(-1) for k in names]
    return {f"{prefix}names": np.array(names),
            f"{prefix}grads": np.concatenate([f if whole else f[grad_sample_index(f.size, samples)] for f in flats]),
            f"{prefix}absmax": np.array([np.abs(f).max() for f in flats], dtype=np.float32)}


def gradient_meta(case, config, head, seed, state, x, x_seed, labels, stats=None, **extra) -> dict:
    return {"case": case, "head": head, "config": config.to_dict(),
            "weights": weights_meta(config, head, seed, stats, state=state),
            "input": {"seed": x_seed, "shape": list(x.shape), "made_by": "random_pixel_values"},
            "input_sha256": array_digest(x), "labels_sha256": array_digest(labels), **extra}


SEED_U_WEIGHTS, SEED_U_INPUT, SEED_U_LABELS = 5001, 5002, 5003
SHAPE_U = (2, 3, 67, 93)


def case_u_b0_gradients():
    """B0 with the real ADE config (dropout 0) and weights from the real statistics, batch 2 at 67 x 93, labels
    with ignored regions: loss, every gradient and d pixel_values in train mode (whole), BatchNorm's running
    statistics after that train-mode forward, then the same in eval mode (sampled), with those updated statistics."""
    config = SegformerConfig.from_dict({**ade_config().to_dict(), **NO_DROPOUT})
    stats = load_weight_stats()
    state = random_state_dict(config, SEMANTIC, seed=SEED_U_WEIGHTS, stats=stats)
    x = random_pixel_values(SEED_U_INPUT, SHAPE_U)
    labels = random_labels(SEED_U_LABELS, (SHAPE_U[0], *SHAPE_U[2:]), config.num_labels)
    arrays = {"labels": labels.astype(np.uint8)}
    with hf_model(config, SEMANTIC, state) as model:
        for mode, train in (("train", True), ("eval", False)):
            loss, grads, dx = torch_value_and_grad(model, state, x, labels, train)
            arrays.update({f"{mode}.loss": np.float64(loss),
                           **gradient_arrays({**grads, "pixel_values": dx}, f"{mode}.", whole=train)})
            if train:
                bn = model.decode_head.batch_norm
                arrays.update({"train.running_mean": np32(bn.running_mean.float()),
                               "train.running_var": np32(bn.running_var.float())})
    meta = gradient_meta("u", config, SEMANTIC, SEED_U_WEIGHTS, state, x, SEED_U_INPUT, labels,
                         WEIGHT_STATS_FIXTURE, labels_seed=SEED_U_LABELS, samples=N_GRAD_SAMPLES)
    save("u_b0_ade_gradients_67x93", arrays, meta)


N_SAMPLES_V = 256
SEED_V = {"b1": 5101, "b2": 5102, "b3": 5103, "b4": 5104, "b5": 5105}
SHAPE_V = (2, 3, 77, 85)  # stages 20 x 22 ... 3 x 3: at least 4 keys after every spatial reduction


def case_v_variant_gradients():
    """b1..b5 (19 labels, dropout 0) in train mode, batch 2 at 77 x 85: loss and sampled gradients."""
    for name, seed in SEED_V.items():
        config = variant_config(name, num_labels=19, **NO_DROPOUT)
        state = random_state_dict(config, SEMANTIC, seed=seed)
        x = random_pixel_values(seed + 100, SHAPE_V)
        labels = random_labels(seed + 200, (SHAPE_V[0], *SHAPE_V[2:]), config.num_labels)
        with hf_model(config, SEMANTIC, state) as model:
            loss, grads, dx = torch_value_and_grad(model, state, x, labels, train=True)
        arrays = {"labels": labels.astype(np.uint8), "train.loss": np.float64(loss),
                  **gradient_arrays({**grads, "pixel_values": dx}, "train.", samples=N_SAMPLES_V)}
        meta = gradient_meta("v", config, SEMANTIC, seed, state, x, seed + 100, labels, variant=name,
                             labels_seed=seed + 200, samples=N_SAMPLES_V)
        save(f"v_{name}_gradients_77x85", arrays, meta)


SEED_W_BINARY, SEED_W_CLASSIFICATION = 5201, 5202
SHAPE_W = (2, 3, 77, 85)


def case_w_binary_and_classification_gradients():
    """num_labels = 1 (HF's BCE, divided by all pixels) in train mode, and the classification head (10 labels) in
    train mode: loss and sampled gradients, B0 shapes, batch 2 at 77 x 85."""
    config = variant_config("b0", num_labels=1, **NO_DROPOUT)
    state = random_state_dict(config, SEMANTIC, seed=SEED_W_BINARY)
    x = random_pixel_values(SEED_W_BINARY + 100, SHAPE_W)
    labels = random_labels(SEED_W_BINARY + 200, (SHAPE_W[0], *SHAPE_W[2:]), 1)
    with hf_model(config, SEMANTIC, state) as model:
        loss, grads, dx = torch_value_and_grad(model, state, x, labels, train=True)
    save("w_b0_binary_gradients_77x85", {"labels": labels.astype(np.uint8), "train.loss": np.float64(loss),
                                         **gradient_arrays({**grads, "pixel_values": dx}, "train.")},
         gradient_meta("w", config, SEMANTIC, SEED_W_BINARY, state, x, SEED_W_BINARY + 100, labels,
                       labels_seed=SEED_W_BINARY + 200, samples=N_GRAD_SAMPLES))

    config = variant_config("b0", num_labels=10, architectures=(CLASSIFICATION,), **NO_DROPOUT)
    state = random_state_dict(config, CLASSIFICATION, seed=SEED_W_CLASSIFICATION)
    x = random_pixel_values(SEED_W_CLASSIFICATION + 100, SHAPE_W)
    labels = np.array([3, 7], dtype=np.int64)
    with hf_model(config, CLASSIFICATION, state) as model:
        loss, grads, dx = torch_value_and_grad(model, state, x, labels, train=True)
    save("w_b0_classification_gradients_77x85", {"labels": labels, "train.loss": np.float64(loss),
                                                  **gradient_arrays({**grads, "pixel_values": dx}, "train.")},
         gradient_meta("w", config, CLASSIFICATION, SEED_W_CLASSIFICATION, state, x, SEED_W_CLASSIFICATION + 100,
                       labels, samples=N_GRAD_SAMPLES))



# ----------------------------------------------------------------------------------------------------------------
# m. The processor's segmentation-map path: do_reduce_labels, NEAREST resize, int64 labels
# ----------------------------------------------------------------------------------------------------------------

SEGMAP_CASES = [
    # name, [(image seed, height, width, mask form: "array" | "P" | "L")], size passed to HF (None: 512 x 512),
    # do_reduce_labels
    ("odd_41x67_to_64_reduce", [(9001, 41, 67, "array")], {"height": 64, "width": 64}, True),
    ("odd_41x67_to_29x48_keep", [(9001, 41, 67, "array")], {"height": 29, "width": 48}, False),
    ("pil_P_and_L_to_50x70_reduce", [(9002, 37, 53, "P"), (9003, 90, 61, "L")], {"height": 50, "width": 70}, True),
    ("default_512_keep", [(9004, 23, 31, "P")], None, False),
]


def segmap_mask(seed: int, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 class ids 0..5 in 4 x 4 blocks (0 included: "other" for do_reduce_labels), a 255 rectangle."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 6, size=(-(-height // 4), -(-width // 4)))
    mask = np.kron(coarse, np.ones((4, 4), dtype=np.int64))[:height, :width].astype(np.uint8)
    mask[height // 3: height // 2, width // 4: width // 2] = 255
    return mask


def case_m_segmentation_maps():
    """SegformerImageProcessorPil with segmentation_maps: the int64 labels, with and without do_reduce_labels.

    Only the labels are kept: the pixel_values of the same call are the image path, which case f records.
    """
    from PIL import Image

    proc = pil_processor(from_real_config=False)
    arrays, cases = {}, []
    for name, items, hf_size, reduce in SEGMAP_CASES:
        images, masks, forms = [], [], []
        for seed, h, w, form in items:
            images.append(smooth_image(seed, h, w))
            mask = segmap_mask(seed + 1, h, w)
            arrays[f"{name}.mask_{len(masks)}"] = mask
            if form == "P":
                pil = Image.fromarray(mask, mode="L").convert("P")
                if not np.array_equal(np.asarray(pil), mask):
                    raise SystemExit("L -> P conversion changed the ids")
                masks.append(pil)
            else:
                masks.append(Image.fromarray(mask, mode="L") if form == "L" else mask.copy())
            forms.append(form)
        kwargs = {} if hf_size is None else {"size": hf_size}
        out = proc(images=images, segmentation_maps=masks, do_reduce_labels=reduce, return_tensors="np", **kwargs)
        labels = np.asarray(out["labels"])
        if labels.dtype != np.int64:
            raise SystemExit(f"HF labels dtype {labels.dtype}")
        arrays[f"{name}.labels"] = labels
        cases.append({"name": name, "images": [{"seed": s, "height": h, "width": w, "mask": f}
                                               for s, h, w, f in items],
                      "image_sha256": [array_digest(im) for im in images], "hf_size": hf_size,
                      "do_reduce_labels": reduce, "shape": list(labels.shape)})
    meta = {"case": "m", "processor": processor_info(proc), "cases": cases, "image_maker": "smooth_image",
            "note": "masks are stored (<name>.mask_i, uint8); 'P' and 'L' masks were passed as PIL images of that "
                    "mode, 'array' ones as (H, W) uint8 arrays"}
    save("m_segmentation_maps", arrays, meta)

# ----------------------------------------------------------------------------------------------------------------
# n. save_pretrained read by transformers, strictly; model surgery as from_pretrained(num_labels=...) reports it
# ----------------------------------------------------------------------------------------------------------------

SEED_S_WEIGHTS, SEED_S_INPUT = 9101, 9102
SHAPE_S = (1, 3, 64, 96)
IMAGE_SIZE_S = (64, 96)


def tiny_config(num_labels: int, **overrides) -> SegformerConfig:
    """A four-stage SegFormer small enough that whole weight sets fit in a fixture (~40k parameters)."""
    fields = dict(hidden_sizes=(8, 16, 40, 64), depths=(1, 2, 1, 1), decoder_hidden_size=32,
                  id2label={i: f"class_{i}" for i in range(num_labels)})
    fields.update(overrides)
    config = SegformerConfig(**fields)
    config.validate()
    return config


def hub_names(keys) -> list[str]:
    return sorted(to_hub_name(k) for k in keys)


def init_kind(t) -> dict:
    """How a freshly initialised tensor looks: all zeros, all ones, or normal with this mean and std."""
    a = t.detach().double().numpy()
    if (a == 0).all():
        return {"kind": "zeros"}
    if (a == 1).all():
        return {"kind": "ones"}
    return {"kind": "normal", "mean": float(a.mean()), "std": float(a.std()), "size": int(a.size)}


def surgery_info(cls, directory, **kwargs) -> dict:
    """What transformers' from_pretrained reports when it fits the checkpoint in `directory` to `cls` + kwargs."""
    model, info = cls.from_pretrained(directory, output_loading_info=True, dtype=torch.float32, **kwargs)
    state = model.state_dict()
    missing = sorted(info["missing_keys"])
    mismatched = [to_hub_name(m[0] if isinstance(m, (tuple, list)) else m) for m in info["mismatched_keys"]]
    return {"missing": hub_names(missing), "unexpected": hub_names(info["unexpected_keys"]),
            "mismatched": sorted(mismatched), "num_labels": model.config.num_labels,
            "reshape_last_stage": model.config.reshape_last_stage,
            "init": {to_hub_name(k): init_kind(state[k]) for k in
                     sorted(set(missing) | {k for k in state if to_hub_name(k) in mismatched})}}


def case_n_save_pretrained():
    """Segformer.save_pretrained loaded strictly by transformers (logits); from_pretrained's surgery reports."""
    from mininp_segformer import Segformer

    config = tiny_config(3)
    state = random_state_dict(config, SEMANTIC, seed=SEED_S_WEIGHTS)
    x = random_pixel_values(SEED_S_INPUT, SHAPE_S)
    surgery = {}
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved"
        Segformer(config, state, image_size=IMAGE_SIZE_S).save_pretrained(saved)
        model, info = SegformerForSemanticSegmentation.from_pretrained(saved, output_loading_info=True,
                                                                       attn_implementation="eager", dtype=torch.float32)
        if any(info.values()):
            raise SystemExit(f"transformers reported problems loading our save_pretrained output: {info}")
        model.eval()
        on_disk = read_safetensors(saved / "model.safetensors")
        hf_state = model.state_dict()
        if sorted(hub_names(hf_state)) != sorted(on_disk):
            raise SystemExit(f"tensors differ: {sorted(set(hub_names(hf_state)) ^ set(on_disk))}")
        for k, v in hf_state.items():
            if not np.array_equal(v.numpy(), on_disk[to_hub_name(k)]):
                raise SystemExit(f"{k} differs between transformers and the saved file")
        proc = SegformerImageProcessorPil.from_pretrained(saved)
        if dict(proc.size) != {"height": IMAGE_SIZE_S[0], "width": IMAGE_SIZE_S[1]}:
            raise SystemExit(f"the saved preprocessor_config.json gives size {proc.size}")
        if model.config.id2label != config.id2label:
            raise SystemExit(f"id2label read back as {model.config.id2label}")
        with torch.no_grad():
            logits = np32(model(torch.from_numpy(x)).logits)

        # Surgery references: a classification checkpoint (as nvidia/mit-b*, reshape_last_stage false), a bare
        # encoder, and a segmentation checkpoint given fewer labels.
        sources = {"classification": (tiny_config(10, reshape_last_stage=False), CLASSIFICATION),
                   "backbone": (tiny_config(2), BACKBONE), "semantic": (tiny_config(3), SEMANTIC)}
        for name, (cfg, head) in sources.items():
            save_checkpoint(Path(tmp) / name, cfg, random_state_dict(cfg, head, seed=SEED_S_WEIGHTS))
        id2label = {0: "road", 1: "car", 2: "tree", 3: "sky"}
        surgery["classification_to_semantic"] = surgery_info(
            SegformerForSemanticSegmentation, Path(tmp) / "classification", id2label=id2label,
            label2id={v: k for k, v in id2label.items()})
        surgery["backbone_to_semantic"] = surgery_info(SegformerForSemanticSegmentation, Path(tmp) / "backbone",
                                                       num_labels=4)
        surgery["semantic_to_2_labels"] = surgery_info(SegformerForSemanticSegmentation, Path(tmp) / "semantic",
                                                       num_labels=2, ignore_mismatched_sizes=True)
        surgery["semantic_to_classification"] = surgery_info(SegformerForImageClassification, Path(tmp) / "semantic")
    meta = {"case": "n", "config": config.to_dict(), "image_size": list(IMAGE_SIZE_S),
            "weights": weights_meta(config, SEMANTIC, SEED_S_WEIGHTS, state=state),
            "input": {"seed": SEED_S_INPUT, "shape": list(SHAPE_S), "made_by": "random_pixel_values"},
            "surgery": surgery, "surgery_seed": SEED_S_WEIGHTS,
            "surgery_sources": {name: {"config": cfg.to_dict(), "head": head} for name, (cfg, head) in sources.items()}}
    save("n_save_pretrained", {"logits": logits}, meta)


# ----------------------------------------------------------------------------------------------------------------
# o. Ten AdamW steps with NVlabs' parameter groups and mmcv's warmup + poly schedule, in torch
# ----------------------------------------------------------------------------------------------------------------

SEED_W_WEIGHTS, SEED_W_INPUT, SEED_W_LABELS = 9201, 9202, 9203
SHAPE_W = (2, 3, 64, 64)
STEPS_W = 10
SEED_W_SAMPLES, SAMPLE_W = 9204, 64  # final weights kept: all of a tensor up to 64 values, else 64 sampled
ADAMW_W = {"lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.05}
SCHEDULE_W = {"max_iters": 16, "power": 1.0, "min_lr": 1e-5, "warmup_iters": 4, "warmup_ratio": 1e-6}


def mmcv_lr(step: int, base_lr: float) -> float:
    """mmcv 1.x PolyLrUpdaterHook.get_lr, then LrUpdaterHook.get_warmup_lr (linear), as before_train_iter does."""
    s = SCHEDULE_W
    regular = (base_lr - s["min_lr"]) * (1 - step / s["max_iters"]) ** s["power"] + s["min_lr"]
    if step >= s["warmup_iters"]:
        return regular
    k = (1 - step / s["warmup_iters"]) * (1 - s["warmup_ratio"])
    return regular * (1 - k)


def w_labels(num_labels: int) -> np.ndarray:
    """(2, 64, 64) int64 labels: blocks of classes 0..num_labels-1 with ~10 % ignored (255)."""
    return np.stack([random_segmentation_pair(SEED_W_LABELS + i, SHAPE_W[2], SHAPE_W[3], num_labels + 2)[1]
                     for i in range(SHAPE_W[0])]).astype(np.int64)


def case_o_adamw():
    """10 steps of torch.optim.AdamW (NVlabs' groups, mmcv's schedule) on a tiny model in eval mode: losses, weights.

    In float64 and in float32. In float32 the two runs part by more than float32's rounding: Adam divides each
    gradient by its own running size, so a gradient that is only rounding noise (the key biases': softmax ignores
    a shift shared by all keys, so their true gradient is exactly 0) still moves its weight by about lr a step,
    in a direction set by the noise -- different in torch and in NumPy. In float64 that noise is far below eps.
    """
    for dtype in ("float64", "float32"):
        adamw_run(dtype)


def adamw_run(dtype: str):
    config = tiny_config(4)
    state = random_state_dict(config, SEMANTIC, seed=SEED_W_WEIGHTS)
    x = random_pixel_values(SEED_W_INPUT, SHAPE_W).astype(dtype)
    labels = w_labels(config.num_labels)
    with hf_model(config, SEMANTIC, state) as model:
        model.to(getattr(torch, dtype))
        if dtype == "float64":  # eager attention computes its softmax in float32 (modeling_segformer.py); sdpa does not
            model.set_attn_implementation("sdpa")
        # The groups mmcv's DefaultOptimizerConstructor builds from NVlabs' paramwise_cfg (custom_keys 'head':
        # lr_mult 10, 'norm': decay_mult 0), decided here from the module types: everything in the decode head gets
        # lr x10 (its BatchNorm too: 'head' is matched first), every LayerNorm of the encoder no weight decay.
        groups, names = [], []
        for module_name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                in_head = module_name.startswith("decode_head")
                no_decay = isinstance(module, torch.nn.LayerNorm) and not in_head
                groups.append({"params": [p], "lr": ADAMW_W["lr"] * (10.0 if in_head else 1.0),
                               "weight_decay": ADAMW_W["weight_decay"] * (0.0 if no_decay else 1.0)})
                names.append(to_hub_name(f"{module_name}.{pname}"))
        opt = torch.optim.AdamW(groups, lr=ADAMW_W["lr"], betas=tuple(ADAMW_W["betas"]), eps=ADAMW_W["eps"],
                                weight_decay=ADAMW_W["weight_decay"], foreach=False, fused=False)
        initial = [g["lr"] for g in opt.param_groups]
        losses, lrs = [], []
        for step in range(STEPS_W):
            for g, lr0 in zip(opt.param_groups, initial):
                g["lr"] = mmcv_lr(step, lr0)
            lrs.append(mmcv_lr(step, ADAMW_W["lr"]))
            opt.zero_grad()
            out = model(pixel_values=torch.from_numpy(x), labels=torch.from_numpy(labels))
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.item()))
        arrays, max_abs = {}, {}
        rng = np.random.default_rng(SEED_W_SAMPLES)
        for n, g in zip(names, opt.param_groups):  # a sample of each larger tensor keeps the fixture small
            w = g["params"][0].detach().numpy().reshape(-1)
            max_abs[n] = float(np.abs(w).max())
            if w.size > SAMPLE_W:
                index = np.sort(rng.choice(w.size, SAMPLE_W, replace=False)).astype(np.int32)
                arrays[f"final_index.{n}"] = index
                w = w[index]
            arrays[f"final.{n}"] = w
        multipliers = {n: [lr0 / ADAMW_W["lr"], g["weight_decay"] / ADAMW_W["weight_decay"]]
                       for n, g, lr0 in zip(names, opt.param_groups, initial)}
    log(f"  losses {losses[0]:.4f} -> {losses[-1]:.4f}")
    arrays.update(losses=np.array(losses), lrs=np.array(lrs), labels=labels.astype(np.uint8))
    meta = {"case": "o", "config": config.to_dict(),
            "weights": weights_meta(config, SEMANTIC, SEED_W_WEIGHTS, state=state),
            "input": {"seed": SEED_W_INPUT, "shape": list(SHAPE_W), "made_by": "random_pixel_values"},
            "labels": {"seed": SEED_W_LABELS, "made_by": "random_segmentation_pair(seed + i, H, W, num_labels + 2)[1]"},
            "adamw": ADAMW_W, "schedule": SCHEDULE_W, "steps": STEPS_W, "multipliers": multipliers,
            "final_max_abs": max_abs, "final_note": "final.<name>: the weights after the last step, flattened; "
                                                     "where final_index.<name> exists, only at those flat indices",
            "optimizer": "torch.optim.AdamW(foreach=False): _single_tensor_adam, decoupled weight decay",
            "mode": "eval (no dropout, no drop path, BatchNorm running statistics)", "dtype": dtype}
    save(f"o_adamw_10_steps_{dtype}", arrays, meta)

CASES = {"a": case_a_photos, "b": case_b_batch_odd, "c": case_c_7_labels, "d": case_d_variants,
         "e": case_e_classification_backbone, "f": case_f_preprocess, "g": case_g_resize, "h": case_h_postprocess,
         "i": case_i_expected_slice, "j": case_j_metrics, "k": case_k_demo_model,
         "l": case_l_components, "m": case_m_segmentation_maps, "n": case_n_save_pretrained, "o": case_o_adamw,
         "u": case_u_b0_gradients, "v": case_v_variant_gradients, "w": case_w_binary_and_classification_gradients}


def main(argv):
    chosen = argv or list(CASES)
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if not (SHARED_DIR / "images").is_dir():
        raise SystemExit(f"{SHARED_DIR} is needed (configs, weight statistics, photos)")
    FIXTURES_DIR.mkdir(parents=True, exist_ok=True)
    versions_path = FIXTURES_DIR / "VERSIONS.json"
    previous = json.loads(versions_path.read_text()) if versions_path.exists() else {}
    for c in chosen:
        t0 = time.perf_counter()
        log(f"case {c}: {CASES[c].__doc__ or CASES[c].__name__}".splitlines()[0])
        CASES[c]()
        log(f"  ({time.perf_counter() - t0:.1f} s)")

    files = dict(previous.get("files", {}))
    files.update(written)
    for name in list(files):
        path = FIXTURES_DIR / name
        if not path.exists():
            del files[name]
            continue
        files[name]["bytes"] = path.stat().st_size
        files[name]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    proc = pil_processor(from_real_config=True)
    record = {
        "generated_by": "tests/make_fixtures.py",
        **VERSIONS,
        "image_processor": processor_info(proc),
        "image_processor_note": "transformers 5.x: SegformerImageProcessor is the torchvision backend; the fixtures "
                                "use SegformerImageProcessorPil (PIL resize, NumPy rescale/normalize), the classic "
                                "slow path that mininp_segformer.preprocess reproduces",
        "model_settings": {"dtype": "float32", "eval": True, "attn_implementation": "eager",
                           "torch_num_threads": torch.get_num_threads()},
        "files": dict(sorted(files.items())),
    }
    versions_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in FIXTURES_DIR.iterdir() if p.is_file())
    log(f"tests/fixtures: {total / 1e6:.2f} MB in total ({total / 2**20:.2f} MiB)")
    if total > SIZE_BUDGET:
        raise SystemExit(f"fixtures take {total} bytes, over the {SIZE_BUDGET} byte budget")


if __name__ == "__main__":
    main(sys.argv[1:])
