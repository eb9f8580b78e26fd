"""mininp_segformer against Hugging Face transformers, through the fixtures in tests/fixtures/ only.

tests/make_fixtures.py (dev-only, needs torch + transformers) wrote what transformers' SegformerForSemanticSegmentation,
SegformerForImageClassification, SegformerModel and SegformerImageProcessorPil return; here the same weights and
inputs are regenerated from their seeds (their SHA-256 digests are checked first) and our outputs compared.
Run with `-s` to see the max |error| of every tensor compared. Never imports torch or transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (BACKENDS, FIXTURES_DIR, PHOTOS, REPO_ROOT, array_digest, assert_close, assert_maps_match, bilinear_at,
                            build_model, check_input_digest, load_fixture, random_logits, random_pixel_values,
                            smooth_image, weights_for)

# Tolerances: max |ours - transformers| <= RTOL * max |transformers| per tensor. The float32 noise of transformers
# itself (float32 vs float64 run) is ~1e-6 of the max, so these leave room while still catching real bugs.
# Observed: <= 2.7e-6 with random weights; 1.25e-5 on the trained demo model's last attention map (k, attention_7),
# where a float64 run puts torch and us each ~6e-6 from the exact probabilities -- float32 rounding, not a bug.
MODEL_RTOL = 2e-5          # logits, hidden states, attentions (the ceiling would be 1e-4)
PREPROCESS_RTOL = 4e-7     # pixel_values: ~3 float32 ulps of their largest value (2.64); bit-identical in practice
RESIZE_RTOL = 1e-6         # bilinear resize vs torch.nn.functional.interpolate
TIE_RTOL = 5e-6            # argmax maps may differ only where our two competing scores are this close (x max|logits|)
REAL_ENV = "MININP_SEGFORMER_REAL_B0_ADE"


def _model_outputs(name, out, ref: dict, meta: dict, rtol=MODEL_RTOL, prefix="", dtype=np.float32):
    """Compare every hidden_state_i / attention_j / logits the fixture holds (ours of `dtype`); returns how many were
    compared."""
    n = 0
    for key in sorted(ref):
        if key.startswith("hidden_state_"):
            i = int(key.rsplit("_", 1)[1])
            assert out.hidden_states is not None, f"{name}: hidden_states not returned"
            assert len(out.hidden_states) == 4, f"{name}: {len(out.hidden_states)} hidden states, expected 4"
            assert_close(f"{name} {prefix}{key}", out.hidden_states[i], ref[key], rtol, dtype=dtype)
        elif key.startswith("attention_"):
            j = int(key.rsplit("_", 1)[1])
            assert out.attentions is not None, f"{name}: attentions not returned"
            assert len(out.attentions) == meta["num_attentions"], (
                f"{name}: {len(out.attentions)} attentions, transformers returns {meta['num_attentions']} "
                "(one per layer, stage-major)")
            assert_close(f"{name} {prefix}{key}", out.attentions[j], ref[key], rtol, dtype=dtype)
        elif key == "logits":
            assert_close(f"{name} logits", out.logits, ref[key], rtol, dtype=dtype)
        else:
            continue
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------------------
# a. B0-ADE (weights drawn from the real per-tensor statistics) on the three photos of ../shared/images
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=BACKENDS)
def photo_model(request):
    _, meta = load_fixture("a_b0_ade_coco")
    for tag in PHOTOS:
        assert load_fixture(f"a_b0_ade_{tag}")[1]["weights"] == meta["weights"], "photo fixtures use other weights"
    model, config, _ = build_model(meta, backend=request.param)
    return model


def _photo(shared_dir: Path, meta: dict) -> Path:
    path = shared_dir / "images" / Path(meta["photo"]).name
    assert path.exists(), f"{path} is missing"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["photo_sha256"], (
        f"{path} is not the photo the fixtures were made from")
    return path


@pytest.mark.parametrize("tag", list(PHOTOS))
def test_photo_preprocess(tag, shared_dir):
    """Our preprocess(path) vs SegformerImageProcessorPil at 4096 sampled positions + per-channel mean/std."""
    from mininp_segformer import preprocess

    ref, meta = load_fixture(f"a_b0_ade_{tag}")
    ours = preprocess(_photo(shared_dir, meta))
    assert ours.shape == tuple(meta["pixel_values_shape"]), f"{tag}: pixel_values shape {ours.shape}"
    assert ours.dtype == np.float32, f"{tag}: pixel_values dtype {ours.dtype}"
    pos = ref["pixel_values_positions"]
    assert_close(f"{tag} pixel_values[{len(pos)} samples]", ours[tuple(pos.T)], ref["pixel_values_samples"],
                 PREPROCESS_RTOL)
    o64 = ours.astype(np.float64)
    scale = float(np.abs(o64).max())  # the statistics' tolerance is that of the pixel values they summarise
    assert_close(f"{tag} pixel_values channel mean", o64.mean(axis=(0, 2, 3)), ref["pixel_values_channel_mean"],
                 atol=PREPROCESS_RTOL * scale, dtype=None)
    assert_close(f"{tag} pixel_values channel std", o64.std(axis=(0, 2, 3)), ref["pixel_values_channel_std"],
                 atol=PREPROCESS_RTOL * scale, dtype=None)


@pytest.mark.parametrize("tag", list(PHOTOS))
def test_photo_model(tag, shared_dir, photo_model):
    """preprocess(photo) -> model -> postprocess(target size = photo size) vs the transformers pipeline."""
    from mininp_segformer import postprocess, preprocess

    ref, meta = load_fixture(f"a_b0_ade_{tag}")
    x = preprocess(_photo(shared_dir, meta))
    out = photo_model(x, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == tuple(meta["logits_shape"]), f"{tag}: logits shape {out.logits.shape}"
    if tag == "coco":
        n = _model_outputs(tag, out, ref, meta)
        assert n == 4 + 1 + 1, f"coco: compared {n} tensors"
    else:
        assert_close(f"{tag} logits[..., ::4, ::4]", out.logits[..., ::4, ::4], ref["logits_sub4"], MODEL_RTOL)
        assert_close(f"{tag} hidden_state_3", out.hidden_states[3], ref["hidden_state_3"], MODEL_RTOL)

    size = tuple(meta["photo_size_hw"])
    maps = postprocess(out.logits, target_sizes=[size])
    assert isinstance(maps, list) and len(maps) == 1, f"{tag}: postprocess returned {type(maps)} of {len(maps)}"
    logits0 = out.logits[0]
    assert_maps_match(f"{tag} segmentation {size}", maps[0], ref["segmentation"],
                      scores=lambda ys, xs: bilinear_at(logits0, size, ys, xs),
                      tie_atol=TIE_RTOL * float(np.abs(logits0).max()))


# ----------------------------------------------------------------------------------------------------------------
# b-e. Random inputs: batch and odd sizes, other label counts, every variant, the classification head, the backbone
# ----------------------------------------------------------------------------------------------------------------

def _random_case(name, decoder="fused", backend="numba"):
    ref, meta = load_fixture(name)
    x = random_pixel_values(meta["input"]["seed"], meta["input"]["shape"])
    check_input_digest(name, x, meta)
    model, config, _ = build_model(meta, decoder, backend)
    return ref, meta, x, model


# Both backends (the numba kernels and the plain-NumPy functions) and both decode heads (the fused default and
# Eq. 4 as written) are held to transformers.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoder", ["fused", "literal"])
def test_b0_ade_batch2_odd_size(decoder, backend):
    """B0-ADE, batch of 2 at 97 x 211: all 4 hidden states, all 8 attentions, logits."""
    ref, meta, x, model = _random_case("b_b0_ade_batch2_97x211", decoder, backend)
    out = model(x, output_hidden_states=True, output_attentions=True)
    n = _model_outputs(f"b0-ade 2x97x211 ({decoder} decoder, {backend})", out, ref, meta)
    assert n == 4 + 8 + 1, f"compared {n} tensors"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoder", ["fused", "literal"])
def test_b0_7_labels_512x683(decoder, backend):
    ref, meta, x, model = _random_case("c_b0_7labels_512x683", decoder, backend)
    out = model(x, output_hidden_states=True)
    assert out.logits.shape == (1, 7, 128, 171)
    n = _model_outputs(f"b0 7 labels 512x683 ({decoder} decoder, {backend})", out, ref, meta)
    assert n == 3, f"compared {n} tensors"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["b1", "b2", "b3", "b4", "b5"])
def test_variant(variant, backend):
    """MiT-b1..b5 (variant_config(name, 19)) at 65 x 77: hidden states, attentions of every layer, logits."""
    from mininp_segformer import SegformerConfig, variant_config

    ref, meta, x, model = _random_case(f"d_{variant}_19labels_65x77", backend=backend)
    assert variant_config(variant, num_labels=19) == SegformerConfig.from_dict(meta["config"]), (
        f"variant_config({variant!r}, 19) is not the config the fixture was made with")
    out = model(x, output_hidden_states=True, output_attentions=True)
    n = _model_outputs(variant, out, ref, meta)
    assert n == 4 + meta["num_attentions"] + 1, f"{variant}: compared {n} tensors"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reshape", [True, False])
def test_classification_head(reshape, backend):
    """SegformerForImageClassification (b0, 10 labels), batch 2, reshape_last_stage True / False.

    With reshape_last_stage=False transformers returns the last hidden state as (B, H*W, C) tokens."""
    ref, meta, x, model = _random_case(f"e_classification_b0_reshape_{str(reshape).lower()}", backend=backend)
    assert model.config.reshape_last_stage is reshape
    out = model(x, output_hidden_states=True)
    assert out.logits.shape == (2, 10)
    assert [list(h.shape) for h in out.hidden_states] == meta["hidden_state_shapes"], "hidden state shapes differ"
    n = _model_outputs(f"classification reshape_last_stage={reshape}", out, ref, meta)
    assert n == 4 + 1, f"compared {n} tensors"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backbone(backend):
    """SegformerModel (no head): last_hidden_state."""
    ref, meta, x, model = _random_case("e_backbone_b0", backend=backend)
    out = model(x)
    assert_close("backbone last_hidden_state", out.last_hidden_state, ref["last_hidden_state"], MODEL_RTOL)


def test_load_checkpoint_directory(tmp_path):
    """save_checkpoint -> load(directory) (head detected from the keys on disk) gives transformers' logits."""
    from mininp_segformer import SegformerConfig, load
    from mininp_segformer.weights import save_checkpoint

    for name in ("e_classification_b0_reshape_true", "b_b0_ade_batch2_97x211"):
        ref, meta = load_fixture(name)
        config = SegformerConfig.from_dict(meta["config"])
        directory = save_checkpoint(tmp_path / name, config, weights_for(meta))
        model = load(directory)
        x = random_pixel_values(meta["input"]["seed"], meta["input"]["shape"])
        check_input_digest(name, x, meta)
        assert_close(f"load({name}) logits", model(x).logits, ref["logits"], MODEL_RTOL)


# ----------------------------------------------------------------------------------------------------------------
# f-h. Preprocessing, bilinear resize and postprocessing alone
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["up_37x53_default", "down_300x451_to_128x96", "list_pil_and_array_to_64"])
def test_preprocess_synthetic(name):
    """preprocess() vs SegformerImageProcessorPil on smooth random uint8 images (arrays and PIL images)."""
    from PIL import Image

    from mininp_segformer import preprocess

    ref, meta = load_fixture("f_preprocess")
    case = next(c for c in meta["cases"] if c["name"] == name)
    images = []
    for spec, digest in zip(case["images"], case["image_sha256"]):
        img = smooth_image(spec["seed"], spec["height"], spec["width"])
        assert array_digest(img) == digest, f"{name}: smooth_image({spec}) changed; regenerate the fixtures"
        images.append(Image.fromarray(img, mode="RGB") if spec["as_pil"] else img)
    size = case["our_size"]
    ours = preprocess(images if len(images) > 1 else images[0], **({} if size is None else {"size": size}))
    assert ours.shape == tuple(case["shape"])
    assert_close(f"preprocess {name} pixel_values", ours, ref[name], PREPROCESS_RTOL)


def _g_cases():
    return ["up_x4", "up_noninteger", "down_x2", "down_noninteger", "mixed_down_up", "logits_like_32_to_120x160",
            "identity", "from_one_pixel_row", "to_one_pixel"]


@pytest.mark.parametrize("name", _g_cases())
def test_resize_bilinear(name):
    """layers.resize_bilinear vs torch.nn.functional.interpolate(bilinear, align_corners=False), NCHW and NHWC."""
    from mininp_segformer.nn.layers import resize_bilinear

    ref, meta = load_fixture("g_resize")
    assert sorted(_g_cases()) == sorted(c["name"] for c in meta["cases"]), "resize cases out of sync with fixture"
    case = next(c for c in meta["cases"] if c["name"] == name)
    x = random_pixel_values(case["seed"], case["shape"])
    check_input_digest(name, x, case)
    size = tuple(case["size"])
    ours = resize_bilinear(x, size)
    assert_close(f"resize {name} {tuple(case['shape'])}->{size}", ours, ref[name], RESIZE_RTOL, dtype=None)
    nhwc = resize_bilinear(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), size, axes=(1, 2))
    assert_close(f"resize {name} channels-last axes=(1, 2)", np.asarray(nhwc).transpose(0, 3, 1, 2), ref[name],
                 RESIZE_RTOL, dtype=None)


@pytest.mark.parametrize("name", ["batch2_up_and_down", "ade_like_150_to_100x130", "no_target_sizes"])
def test_postprocess(name):
    """postprocess() vs post_process_semantic_segmentation on random logits, with and without target sizes."""
    from mininp_segformer import postprocess

    ref, meta = load_fixture("h_postprocess")
    case = next(c for c in meta["cases"] if c["name"] == name)
    logits = random_logits(case["seed"], case["shape"])
    check_input_digest(name, logits, case)
    sizes = case["target_sizes"]
    maps = postprocess(logits, target_sizes=None if sizes is None else [tuple(s) for s in sizes])
    assert isinstance(maps, list) and len(maps) == len(logits)
    for i, m in enumerate(maps):
        expected = ref[f"{name}__{i}"]
        lg = logits[i]
        if sizes is None:
            scores = lambda ys, xs, lg=lg: lg[:, ys, xs].astype(np.float64)  # noqa: E731
        else:
            scores = lambda ys, xs, lg=lg, s=tuple(sizes[i]): bilinear_at(lg, s, ys, xs)  # noqa: E731
        assert_maps_match(f"postprocess {name}[{i}] {expected.shape}", np.asarray(m), expected, scores,
                          TIE_RTOL * float(np.abs(lg).max()))


# ----------------------------------------------------------------------------------------------------------------
# i. The real nvidia/segformer-b0-finetuned-ade-512-512 (only where a user has downloaded it)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.environ.get(REAL_ENV), reason=f"set {REAL_ENV} to a directory holding the real "
                    "nvidia/segformer-b0-finetuned-ade-512-512 (config.json + model.safetensors)")
def test_real_b0_ade_expected_logits(shared_dir):
    """Our logits[0, :3, :3, :3] on the COCO cats equal transformers' integration-test slice within 1e-4."""
    from mininp_segformer import load, preprocess

    expected = json.loads((FIXTURES_DIR / "expected_logits_b0_ade.json").read_text(encoding="utf-8"))
    directory = Path(os.environ[REAL_ENV])
    assert (directory / "config.json").exists() and (directory / "model.safetensors").exists(), (
        f"{REAL_ENV}={directory} must hold config.json and model.safetensors")
    model = load(directory)
    logits = model(preprocess(shared_dir / "images" / expected["image"])).logits
    assert logits.shape == tuple(expected["logits_shape"])
    assert_close("real b0-ade logits[0, :3, :3, :3]", logits[0, :3, :3, :3],
                 np.array(expected["logits_0_:3_:3_:3"], dtype=np.float32),
                 atol=expected["atol"])  # transformers' own integration-test tolerance, recorded with the values


# ----------------------------------------------------------------------------------------------------------------
# The fixtures themselves
# ----------------------------------------------------------------------------------------------------------------

def test_fixtures_within_size_budget():
    total = sum(p.stat().st_size for p in FIXTURES_DIR.iterdir() if p.is_file())
    print(f"tests/fixtures: {total / 1e6:.2f} MB")
    assert total <= 50_000_000, f"tests/fixtures holds {total} bytes, over the 50 MB budget"
    versions = json.loads((FIXTURES_DIR / "VERSIONS.json").read_text(encoding="utf-8"))
    assert versions["image_processor"]["class"].endswith("SegformerImageProcessorPil")
    assert versions["image_processor"]["backend"] == "pil"
    for name, info in versions["files"].items():
        path = FIXTURES_DIR / name
        assert path.exists(), f"VERSIONS.json lists {name}, which is missing"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"], (
            f"{name} differs from what make_fixtures.py recorded in VERSIONS.json (regenerate all fixtures together)")


def test_parity_tests_never_import_torch_or_transformers():
    """The comparison side must run without torch/transformers: only make_fixtures.py may import them."""
    import sys

    leaked = [m for m in ("torch", "transformers") if m in sys.modules]
    assert not leaked, f"{leaked} got imported during the tests; the tests must only read tests/fixtures/"


# ----------------------------------------------------------------------------------------------------------------
# k. The trained demo model (weights/segformer-b0-shapes) on held-out scene 7
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_model_against_transformers(backend):
    """A trained model rather than random weights: preprocessing, every hidden state and attention, logits, map."""
    import hashlib

    import mininp_segformer as ms
    from mininp_segformer.tools.scenes import make_scene

    ref, meta = load_fixture("k_demo_model_scene7")
    directory = REPO_ROOT / meta["model"]
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert digest == meta["model_sha256"], "the demo model changed: regenerate with `python tests/make_fixtures.py k`"
    model = ms.load(directory, backend=backend)
    image, _ = make_scene(meta["scene_seed"], size=tuple(meta["size"]))
    x = ms.preprocess(image, size=model.image_size)
    assert_close("demo pixel_values", x, ref["pixel_values"], PREPROCESS_RTOL)
    out = model(x, output_hidden_states=True, output_attentions=True)
    n = _model_outputs("demo model scene 7", out, ref, meta)
    assert n == 4 + meta["num_attentions"] + 1, f"compared {n} tensors"
    seg = ms.postprocess(out.logits, target_sizes=[image.shape[:2]])[0]
    assert_maps_match("demo model scene 7 map", seg, ref["segmentation"],
                      scores=lambda ys, xs: bilinear_at(out.logits[0], image.shape[:2], ys, xs),
                      tie_atol=TIE_RTOL * float(np.abs(out.logits).max()))


# ----------------------------------------------------------------------------------------------------------------
# l. The demo model taken apart: each component against the torch module's own output (the notebooks' references)
# ----------------------------------------------------------------------------------------------------------------

def test_demo_model_components_against_transformers():
    """Patch merging, LayerNorm, spatial reduction, attention, Mix-FFN, the block, the decoder's pieces; each fed the
    torch reference of its input, so an error is pinned to one component rather than accumulated."""
    import mininp_segformer as ms
    from mininp_segformer.nn import attention, decoder, encoder, kernels, layers
    from mininp_segformer.tools.scenes import make_scene

    ref, meta = load_fixture("l_demo_model_components")
    directory = REPO_ROOT / meta["model"]
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert digest == meta["model_sha256"], "the demo model changed: regenerate with `python tests/make_fixtures.py l`"
    model = ms.load(directory)
    config, enc = model.config, model.params["segformer"]["encoder"]
    image, _ = make_scene(meta["scene_seed"], size=tuple(meta["size"]))
    x = ms.preprocess(image, size=tuple(meta["size"]))
    assert_close("l pixel_values", x, ref["pixel_values"], PREPROCESS_RTOL)

    def nhwc(a):  # (B, C, H, W) -> (B, H, W, C)
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1))

    pe = enc["patch_embeddings"][0]
    proj = layers.conv2d(nhwc(x), pe["proj"]["weight"], pe["proj"]["bias"], stride=config.strides[0],
                         padding=config.patch_sizes[0] // 2)
    assert_close("l patch_embed_0_proj", proj, nhwc(ref["patch_embed_0_proj"]), MODEL_RTOL)
    tokens = encoder.overlap_patch_merging(nhwc(x), pe, config.patch_sizes[0], config.strides[0])
    b, h, w, c = tokens.shape
    assert_close("l patch_embed_0", tokens.reshape(b, h * w, c), ref["patch_embed_0"], MODEL_RTOL)

    blk = enc["block"][0][0]
    ln1 = layers.layer_norm(ref["patch_embed_0"], **blk["layer_norm_1"])
    assert_close("l block_0_0_layer_norm_1", ln1, ref["block_0_0_layer_norm_1"], MODEL_RTOL)
    ps, r = blk["attention"]["self"], config.sr_ratios[0]
    reduced = attention.spatial_reduction(ref["block_0_0_layer_norm_1"], h, w, ps, r)
    assert_close("l block_0_0_sr_layer_norm", reduced, ref["block_0_0_sr_layer_norm"], MODEL_RTOL)
    attn, probs = attention.efficient_self_attention(ref["block_0_0_layer_norm_1"], h, w, blk["attention"],
                                                     config.num_attention_heads[0], r)
    assert_close("l block_0_0_attention", attn, ref["block_0_0_attention"], MODEL_RTOL)
    assert_close("l attention_0", probs, ref["attention_0"], MODEL_RTOL)

    mlp = blk["mlp"]
    ln2 = ref["block_0_0_layer_norm_2"]
    dense1 = layers.linear(ln2, **mlp["dense1"])
    assert_close("l block_0_0_dense1", dense1, ref["block_0_0_dense1"], MODEL_RTOL)
    dw = layers.depthwise_conv3x3(ref["block_0_0_dense1"].reshape(b, h, w, -1), **mlp["dwconv"]["dwconv"])
    assert_close("l block_0_0_dwconv", dw.reshape(b, h * w, -1), ref["block_0_0_dwconv"], MODEL_RTOL)
    assert_close("l block_0_0_mlp", encoder.mix_ffn(ln2, h, w, mlp), ref["block_0_0_mlp"], MODEL_RTOL)
    out, _ = encoder.transformer_block(ref["patch_embed_0"], h, w, blk, config.num_attention_heads[0], r)
    assert_close("l block_0_0", out, ref["block_0_0"], MODEL_RTOL)

    head = model.params["decode_head"]
    stages = [nhwc(ref[f"hidden_state_{i}"]) for i in range(4)]
    for i, f in enumerate(stages):
        bi, hi, wi, ci = f.shape
        proj_i = layers.linear(f, **head["linear_c"][i]["proj"]).reshape(bi, hi * wi, -1)
        assert_close(f"l decode_linear_c_{i}", proj_i, ref[f"decode_linear_c_{i}"], MODEL_RTOL)
    assert_close("l logits (literal head)", decoder.all_mlp_decode_head(stages, head), nhwc(ref["logits"]), MODEL_RTOL)
    assert_close("l logits (model)", model(x).logits, ref["logits"], MODEL_RTOL)

    # the size the model never trained on: logits and the post-processed map
    size_u = tuple(meta["unseen_size"])
    image_u, _ = make_scene(meta["scene_seed"], size=size_u)
    out_u = model(ms.preprocess(image_u, size=size_u))
    assert_close("l unseen_logits", out_u.logits, ref["unseen_logits"], MODEL_RTOL)
    seg = ms.postprocess(out_u.logits, target_sizes=[size_u])[0]
    assert_maps_match("l unseen map", seg, ref["unseen_segmentation"],
                      scores=lambda ys, xs: bilinear_at(out_u.logits[0], size_u, ys, xs),
                      tie_atol=TIE_RTOL * float(np.abs(out_u.logits).max()))

    # GELU: both implementations against torch's exact (erf) GELU, within 4 float32 ulps of the largest value (5);
    # align_corners=False resize on the tiny example
    assert_close("l gelu (layers)", layers.gelu(ref["gelu_x"]), ref["gelu_erf"], 4e-7)
    assert_close("l gelu (kernels)", kernels.gelu(ref["gelu_x"].copy()), ref["gelu_erf"], 4e-7)
    assert_close("l resize tiny", layers.resize_bilinear(ref["resize_tiny_input"], (4, 6)),
                 ref["resize_tiny_align_corners_false"], RESIZE_RTOL)


# ----------------------------------------------------------------------------------------------------------------
# The chapters' parity helper and nbval's sanitizer: machine-dependent figures masked, verdicts compared
# ----------------------------------------------------------------------------------------------------------------

def test_parity_compare_masks_only_machine_dependent_figures(capsys):
    import configparser
    import re

    from mininp_segformer.tools import parity

    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "notebooks" / "nbval_sanitize.cfg", encoding="utf-8")

    def sanitized(text):
        for section in cfg.sections():
            text = re.sub(cfg[section]["regex"], cfg[section]["replace"], text)
        return text

    ref = (np.arange(60, dtype=np.float32).reshape(3, 4, 5) - 12) / 2  # -6 .. 23.5, multiples of 1/2
    lines = []
    for err in (1.3e-5, 1.9e-5, 0.0):  # as two CPUs might give, and a bit-identical one
        parity.compare("logits", ref + np.float32(err), ref)
        lines.append(capsys.readouterr().out)
    assert "\u2248" in lines[0] and "<= 2e-05" in lines[0] and "(3, 4, 5)" in lines[0]
    assert lines[0] != lines[1] and len({sanitized(line) for line in lines}) == 1
    parity.compare("logits", ref, ref, width=10)
    assert sanitized(capsys.readouterr().out) != sanitized(lines[0])  # the layout is compared
    with pytest.raises(AssertionError, match="logits: max|err|"):
        parity.compare("logits", ref + np.float32(1e-3), ref)  # 4.3e-5 of max|ref| > 2e-5
    with pytest.raises(AssertionError):
        parity.compare("logits", ref * np.nan, ref)
    assert sanitized(parity.approx(-2.4107015, ".6f")) == sanitized(parity.approx(-2.4107022, ".6f"))
    assert parity.relative_error(ref + np.float32(0.25), ref) == 0.25 / 23.5  # exact sums in float32


# ----------------------------------------------------------------------------------------------------------------
# float64: the plain-NumPy backend in double precision, against transformers' float32 and against our float32
# ----------------------------------------------------------------------------------------------------------------

def test_float64_numpy_backend():
    """In float64 our model sits within transformers' own float32 noise of its outputs, and our float32 run within
    that noise of the float64 one: the float32 errors are rounding, not a difference in the computation."""
    from mininp_segformer import Segformer

    ref, meta, x, model32 = _random_case("b_b0_ade_batch2_97x211", backend="numpy")
    model64 = Segformer(model32.config, weights_for(meta), backend="numpy", dtype="float64")
    out64 = model64(x.astype(np.float64), output_hidden_states=True, output_attentions=True)
    assert out64.logits.dtype == np.float64 and all(h.dtype == np.float64 for h in out64.hidden_states)
    n = _model_outputs("b0-ade 2x97x211 (numpy, float64)", out64, ref, meta, dtype=np.float64)
    assert n == 4 + 8 + 1
    out32 = model32(x, output_hidden_states=True)
    for i, h in enumerate(out32.hidden_states):
        assert_close(f"float32 vs float64 hidden_state_{i}", h, out64.hidden_states[i], 4e-6)
    assert_close("float32 vs float64 logits", out32.logits, out64.logits, 4e-6)
    seg64, seg32 = out64.logits.argmax(1), out32.logits.argmax(1)
    assert (seg64 != seg32).mean() < 1e-3  # only near ties may flip
