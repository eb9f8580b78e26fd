"""Checkpoints and configs built to be turned against the user: crafted safetensors headers, absurd config values,
FIFOs and directories where files belong, NaN weights. Each must be refused at once with an error that names the
file and the problem -- never loaded silently, never a hang, never gigabytes allocated first.

The safetensors files are written by hand (8-byte header length + JSON + data), mostly with bfloat16 tensors:
a bfloat16 tensor once switched loading to a reader that skipped safetensors' validation.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import mininp_segformer as ms
from mininp_segformer.tools import cli
from mininp_segformer.config import SegformerConfig, variant_config
from mininp_segformer.errors import CheckpointError, ConfigError
from mininp_segformer.tools.flops import stage_sizes
from mininp_segformer.model import min_input_size
from mininp_segformer.weights import random_state_dict, save_checkpoint
from tests.conftest import deadline
from tests.tiny_checkpoint import make_checkpoint, safetensors_parts, write_safetensors

CONFIG = variant_config("b0", num_labels=5)
BIAS = "decode_head.batch_norm.bias"
RUNNING_MEAN = "decode_head.batch_norm.running_mean"
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


@pytest.fixture(scope="module")
def state():
    return random_state_dict(CONFIG, seed=5)


@pytest.fixture
def ckpt(tmp_path, state):
    return save_checkpoint(tmp_path / "ckpt", CONFIG, state)


def run_python(code: str, *args, timeout: float, memory_gb: float = 4.0) -> subprocess.CompletedProcess:
    """`python -c code args...` with a time limit and an address-space limit, so that a regression fails the test
    instead of hanging it or exhausting the machine."""
    def limit_memory():
        import resource
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit_memory)


# ---------------------------------------------------------------------------------------------------------------
# safetensors: safetensors' own rules, for every dtype


def load_parts(ckpt, header, data):
    write_safetensors(ckpt / "model.safetensors", header, data)
    return ms.load(ckpt)


def shift_from(header: dict, name: str, n: int) -> None:
    """Move `name` and every tensor stored after it n bytes later in the data section."""
    begin = header[name]["data_offsets"][0]
    for info in header.values():
        if info["data_offsets"][0] >= begin:
            info["data_offsets"] = [o + n for o in info["data_offsets"]]


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_overlapping_tensors_are_refused(ckpt, state, dtype):
    # running_mean stored nowhere of its own: its offsets are the bias's bytes, so it would silently equal the bias
    header, data = safetensors_parts({k: v for k, v in state.items() if k != RUNNING_MEAN}, dtype)
    header[RUNNING_MEAN] = dict(header[BIAS])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors file: tensor .* "
                                              r"overlaps the tensor before it"):
        load_parts(ckpt, header, data)


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_gap_between_tensors_is_refused(ckpt, state, dtype):
    header, data = safetensors_parts(state, dtype)
    begin = header[BIAS]["data_offsets"][0]
    shift_from(header, BIAS, 4)
    with pytest.raises(CheckpointError, match="leaves a gap of 4 bytes"):
        load_parts(ckpt, header, data[:begin] + bytes(4) + data[begin:])


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_offsets_past_the_end_of_the_file_are_refused(ckpt, state, dtype):
    header, data = safetensors_parts(state, dtype)
    with pytest.raises(CheckpointError, match=rf"its tensors need {len(data):,} bytes of data but the file holds "
                                              rf"{len(data) - 2:,} \(it is truncated\)"):
        load_parts(ckpt, header, data[:-2])


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_bytes_after_the_last_tensor_are_refused(ckpt, state, dtype):
    header, data = safetensors_parts(state, dtype)
    with pytest.raises(CheckpointError, match="8 bytes after its last tensor"):
        load_parts(ckpt, header, data + bytes(8))


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_byte_size_must_match_dtype_and_shape(ckpt, state, dtype):
    header, data = safetensors_parts(state, dtype)
    header[BIAS]["shape"] = [255]  # one element fewer than its bytes hold
    with pytest.raises(CheckpointError, match=rf"tensor '{BIAS}' has data_offsets .* but its {dtype} shape \[255\] "
                                              rf"needs {255 * (2 if dtype == 'BF16' else 4)} bytes"):
        load_parts(ckpt, header, data)


@pytest.mark.parametrize("metadata", [{"format": 1}, ["pt"], "pt", {"format": None}])
def test_malformed_metadata_is_refused(ckpt, state, metadata):
    header, data = safetensors_parts(state, "BF16")
    header["__metadata__"] = metadata
    with pytest.raises(CheckpointError, match="__metadata__ must map strings to strings"):
        load_parts(ckpt, header, data)


def test_header_must_be_utf8_json_object_starting_with_a_brace(ckpt, state):
    header, data = safetensors_parts(state, "BF16")
    raw = json.dumps(header).encode()
    cases = [
        (b" " + raw, "does not start with '{'"),
        (raw.replace(BIAS.encode(), BIAS.encode() + b"\xff"), "not UTF-8"),
        (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests too deeply"),
        # a name given twice: JSON readers disagree on which entry wins
        (b'{"' + BIAS.encode() + b'": ' + json.dumps(header[RUNNING_MEAN]).encode() + b", " + raw[1:],
         f"key '{BIAS}' appears twice"),
    ]
    for raw_header, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_parts(ckpt, raw_header, data)


def test_shape_overflow_is_refused(ckpt, state):
    header, data = safetensors_parts(state, "BF16")
    header["x"] = {"dtype": "F32", "shape": [2**63, 2**63, 0], "data_offsets": [len(data), len(data)]}
    with pytest.raises(CheckpointError, match="overflows"):
        load_parts(ckpt, header, data)


def test_a_100mb_header_is_refused_before_it_is_read(ckpt):
    # 1.4 million tiny tensors: once 40 s and 2.8 GB of RAM to parse, now refused from its 8-byte length alone
    n, target = 1_400_000, 100_000_000
    entry = b'"t%d":{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'
    raw = b"{" + b",".join(entry % (i, 4 * i, 4 * i + 4) for i in range(n)) + b"}"
    assert len(raw) <= target
    write_safetensors(ckpt / "model.safetensors", raw + b" " * (target - len(raw)), bytes(4 * n))
    del raw
    r = run_python("import sys; from mininp_segformer.tools import cli; sys.exit(cli.main(['info', sys.argv[1]]))",
                   ckpt, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "header claims 100,000,000 bytes, more than the 8,388,608 this reader accepts" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# files that are not regular files


@needs_fifo
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "preprocessor_config.json"])
def test_a_fifo_is_refused_without_blocking(tmp_path, name):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)  # opening it for reading would wait for a writer, forever
    with deadline(20), pytest.raises(ms.SegformerError, match=rf"{name} is not a regular file \(a FIFO"):
        ms.load(ckpt)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "preprocessor_config.json"])
def test_a_directory_in_place_of_a_file_is_refused(tmp_path, name):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / name).unlink()
    (ckpt / name).mkdir()
    with pytest.raises(ms.SegformerError, match=rf"{name} is a directory"):
        ms.load(ckpt)


# ---------------------------------------------------------------------------------------------------------------
# config.json: every field's type and range, checked before anything is built


def config_file(tmp_path, **changes):
    d = CONFIG.to_dict()
    d.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("changes,message", [
    # sizes of 1e9: a billion blocks / channels / kernel taps would be built before any weight is read
    (dict(depths=[2, 2, 10**9, 2]), r"depths\[2\] must be an integer from 1 to 1000, got 1000000000"),
    (dict(hidden_sizes=[32, 64, 160, 10**9]), r"hidden_sizes\[3\] must be an integer from 1 to 16384"),
    (dict(num_attention_heads=[1, 2, 5, 10**9]), r"num_attention_heads\[3\] must be an integer from 1 to 1024"),
    (dict(mlp_ratios=[4, 4, 4, 10**9]), r"mlp_ratios\[3\] must be an integer from 1 to 64"),
    (dict(patch_sizes=[10**9, 3, 3, 3]), r"patch_sizes\[0\] must be an integer from 1 to 64"),
    (dict(strides=[10**9, 2, 2, 2]), r"strides\[0\] must be an integer from 1 to 64"),
    (dict(sr_ratios=[10**9, 4, 2, 1]), r"sr_ratios\[0\] must be an integer from 1 to 64"),
    (dict(num_channels=10**9), "num_channels must be an integer from 1 to 64"),
    (dict(decoder_hidden_size=10**9), "decoder_hidden_size must be an integer from 1 to 16384"),
    (dict(num_encoder_blocks=10**9), "num_encoder_blocks must be an integer from 1 to 8"),
    # strings, null, bools where integers belong; zero and negative sizes
    (dict(hidden_sizes=["32", 64, 160, 256]), r"hidden_sizes\[0\] must be an integer .* got '32' \(string\)"),
    (dict(num_encoder_blocks="4"), r"num_encoder_blocks must be an integer .* got '4' \(string\)"),
    (dict(depths=None), r"depths must be a list of 4 integers .* got None \(null\)"),
    (dict(decoder_hidden_size=None), r"decoder_hidden_size must be an integer .* got None \(null\)"),
    (dict(strides=[True, 2, 2, 2]), r"strides\[0\] must be an integer .* got True \(boolean\)"),
    (dict(num_channels=True), r"num_channels must be an integer .* got True \(boolean\)"),
    (dict(depths=[2, 0, 2, 2]), r"depths\[1\] must be an integer from 1 to 1000, got 0"),
    (dict(decoder_hidden_size=-256), "decoder_hidden_size must be an integer from 1 to 16384, got -256"),
    (dict(semantic_loss_ignore_index="255"), "semantic_loss_ignore_index must be an integer"),
    (dict(layer_norm_eps="1e-6"), r"layer_norm_eps must be a number from 0.0 to inf, got '1e-6'"),
    (dict(hidden_dropout_prob=2.0), "hidden_dropout_prob must be a number from 0.0 to 1.0, got 2.0"),
    (dict(reshape_last_stage="yes"), "reshape_last_stage must be true or false"),
    (dict(architectures=5), "architectures must be a list of class names"),
    (dict(hidden_sizes=[32, 64, 160, 250]), r"hidden_sizes\[3\] = 250 is not divisible by its "
                                            r"num_attention_heads\[3\] = 8"),
    # labels
    (dict(id2label=["wall", "floor"]), r"id2label must be a JSON object .* got \['wall', 'floor'\] \(list\)"),
    (dict(id2label={"0": "wall", "one": "floor"}), "id2label keys must be the class ids 0..1, got 'one'"),
    (dict(id2label={"0": "wall", "1": 7}), r"id2label names must be strings, got 1: 7 \(integer\)"),
    (dict(id2label={str(i): "x" for i in range(100_001)}), "the number of labels in id2label must be an integer "
                                                           "from 1 to 100000, got 100001"),
])
def test_absurd_config_values_are_refused_naming_file_and_field(tmp_path, changes, message):
    path = config_file(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message) as e:
        SegformerConfig.from_json(path)
    assert str(e.value).startswith(f"{path}: ")


def test_num_labels_of_1e9_fails_before_allocating(tmp_path):
    d = CONFIG.to_dict()
    del d["id2label"], d["label2id"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**d, "num_labels": 10**9}))
    code = ("import sys\nfrom mininp_segformer.config import ConfigError, SegformerConfig\n"
            "try:\n    SegformerConfig.from_json(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n    sys.exit(3)")
    r = run_python(code, path, timeout=60, memory_gb=4)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "num_labels must be an integer from 1 to 100000, got 1000000000" in r.stdout


def test_config_json_that_cannot_be_parsed(tmp_path):
    cases = [(b'{"model_type": "segformer", "name": "caf\xe9"}', r"not UTF-8 text \(byte 40 is 0xe9\)"),
             (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests too deeply"),
             (b'{"a": ' + b"9" * 5000 + b"}", "cannot be parsed as JSON")]
    for raw, message in cases:
        (tmp_path / "config.json").write_bytes(raw)
        with pytest.raises(ConfigError, match=message):
            SegformerConfig.from_json(tmp_path / "config.json")


def test_null_architectures_is_what_hf_writes_for_none(tmp_path):
    assert SegformerConfig.from_json(config_file(tmp_path, architectures=None)).architectures == ()


def test_the_error_names_the_checkpoint_file(ckpt):
    config_file(ckpt, depths=[2, 2, 5000, 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt / 'config.json'}: depths[2] must be")):
        ms.load(ckpt)


def test_min_input_size_is_bounded_and_exact():
    # built without validation (which refuses strides above 64): a linear search would never finish
    absurd = SegformerConfig(strides=(10**9, 2, 2, 2))
    with deadline(20):
        m = min_input_size(absurd)
    for config in (absurd, variant_config("b0"), variant_config("b0", sr_ratios=(1, 1, 1, 1)),
                   variant_config("b0", strides=(3, 5, 2, 7), patch_sizes=(5, 7, 3, 9), sr_ratios=(6, 1, 3, 2))):
        m = min_input_size(config)

        def fits(n, config=config):
            return all(h >= r for (h, _), r in zip(stage_sizes(config, n, n), config.sr_ratios))

        assert fits(m) and (m == 1 or not fits(m - 1)), (config, m)


# ---------------------------------------------------------------------------------------------------------------
# silently wrong answers


def test_nan_and_inf_weights_are_refused_naming_the_tensors(tmp_path, state):
    broken = dict(state)
    broken["decode_head.classifier.weight"] = np.full_like(state["decode_head.classifier.weight"], np.nan)
    broken["decode_head.batch_norm.weight"] = state["decode_head.batch_norm.weight"].copy()
    broken["decode_head.batch_norm.weight"][3] = np.inf
    save_checkpoint(tmp_path, CONFIG, broken)
    with pytest.raises(CheckpointError, match=r"not finite \(2\)") as e:
        ms.load(tmp_path)
    assert "decode_head.classifier.weight: 1,280 of 1,280 values are NaN or inf" in str(e.value)
    assert "decode_head.batch_norm.weight: 1 of 256 values are NaN or inf" in str(e.value)
    with pytest.raises(CheckpointError, match="not finite"):
        ms.Segformer(CONFIG, broken)


def test_preprocessor_size_forms_that_hf_accepts(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    for size, expected in [([64, 96], (64, 96)), ({"height": 48, "width": 80}, (48, 80)), (72, (72, 72)),
                           (None, (512, 512))]:
        (ckpt / "preprocessor_config.json").write_text(json.dumps({"size": size}))
        assert ms.load(ckpt).image_size == expected, size


@pytest.mark.parametrize("size,message", [
    ({"shortest_edge": 64}, "is not a size SegFormer's image processor accepts"),  # HF's resize() refuses it too
    ([64, 96, 3], "is not a size SegFormer's image processor accepts"),
    ({"height": "64", "width": 64}, r"size \(height\) must be an integer from 29 to 8192, got '64'"),
    ([16, 64], r"size \(height\) must be an integer from 29 to 8192, got 16 .*minimum input is 29 pixels"),
    (10**9, r"size \(height\) must be an integer from 29 to 8192, got 1000000000"),
])
def test_preprocessor_size_that_hf_would_not_accept_is_refused(tmp_path, size, message):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"size": size}))
    with pytest.raises(ConfigError, match=message) as e:
        ms.load(ckpt)
    assert "preprocessor_config.json" in str(e.value)


def test_info_refuses_an_input_below_the_minimum(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "b0", "--size", "1", "1"])
    assert e.value.code == 2
    assert "smaller than this model's minimum, 29 x 29" in capsys.readouterr().err
