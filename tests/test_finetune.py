"""Fine-tuning in CI: `mininp-segformer train` takes the bundled demo model (six classes) to a new label set.

The new classes merge the demo's: square and triangle -> "polygon", circle and ring -> "round", star and
background kept. `load(..., id2label=)` gives the model a fresh classifier for the four classes (model surgery),
so before training its held-out mIoU is that of a random head; 30 steps of 4 scenes (64 x 64, no augmentation,
lr 1e-3 -- the head's 1e-2) teach the new head to read the encoder's shape features.

Measured (2 cores, ~4 s of training): mIoU 0.118 before, 0.860 after, on 32 held-out scenes. The bounds below
leave a wide margin on both sides: before <= 0.3, after >= 0.7.
"""

import json

import numpy as np

import mininp_segformer as ms
from mininp_segformer.tools.cli import main
from mininp_segformer.tools.scenes import HELD_OUT_SEEDS, TRAIN_SEED_START
from mininp_segformer.training.data import open_dataset
from mininp_segformer.training.trainer import dataset_samples, validation_miou
from tests.test_trainer import write_scenes

# the demo ids (background, circle, square, triangle, ring, star) -> the new ones
REMAP = np.array([0, 2, 1, 1, 2, 3])
ID2LABEL = {0: "background", 1: "polygon", 2: "round", 3: "star"}
BEFORE_AT_MOST, AFTER_AT_LEAST = 0.3, 0.7  # measured 0.118 and 0.860 (see the module doc)


def test_fine_tune_the_demo_model_to_merged_classes(tmp_path, recwarn):
    train_dir = write_scenes(tmp_path / "train", range(TRAIN_SEED_START, TRAIN_SEED_START + 64), (64, 64), REMAP)
    val_dir = write_scenes(tmp_path / "val", HELD_OUT_SEEDS[:32], (64, 64), REMAP)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(ID2LABEL))
    held_out = dataset_samples(open_dataset(val_dir, labels=labels))

    fresh = ms.load("segformer-b0-shapes", id2label=ID2LABEL, seed=0)  # what `train` starts from
    assert "decode_head.classifier" in str(recwarn.pop(UserWarning).message)  # the surgery's one line
    before = validation_miou(fresh, held_out())
    assert before <= BEFORE_AT_MOST

    out = tmp_path / "polygons"
    assert main(["train", "--model", "segformer-b0-shapes", "--data", str(train_dir), "--labels", str(labels),
                 "--out", str(out), "--steps", "30", "--batch-size", "4", "--crop", "64", "--lr", "1e-3",
                 "--no-augment", "--holdout", "0", "--save-every", "0", "--threads", "2", "-q"]) == 0
    tuned = ms.load(out)
    assert tuned.id2label == ID2LABEL
    after = validation_miou(tuned, held_out())
    assert after >= AFTER_AT_LEAST, f"held-out mIoU {before:.3f} -> {after:.3f}"
