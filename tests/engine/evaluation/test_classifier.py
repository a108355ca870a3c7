"""The recognition instrument: `python -m training.classifier` trains a classifier that `ddpm-engine score`
reads back, and score counts, per class, the samples the classifier assigns to their requested class."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from engine.apps.cli import main
from engine.config import CIFAR10_CLASSES, PRESETS, DiffusionConfig
from engine.evaluation.classifier import (
    ClassifierError,
    ResNet9,
    load_classifier,
    predict,
    recognition,
    save_classifier,
)
from engine.formats.checkpoint import save_checkpoint
from engine.model import UNet
from training.classifier import augment, learning_rate
from training.classifier import main as train_main

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}  # two classes no classifier can confuse


def coloured(colour, n, seed):
    """n noisy 32 x 32 images of one colour, uint8 N x 32 x 32 x 3."""
    rng = np.random.default_rng(seed)
    return np.clip(np.array(colour) + rng.normal(0, 25, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


def two_class_model(tmp_path):
    """A (random) diffusion checkpoint whose classes are named blue and red, in that order."""
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, UNet(replace(PRESETS["tiny"], num_classes=2)), DiffusionConfig(num_timesteps=10),
                    ("blue", "red"))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A width-4 classifier trained for a few steps on red and blue folders; (its path, the data folder)."""
    root = tmp_path_factory.mktemp("colours")
    for split, seed in (("train", 0), ("test", 1)):
        for k, (name, colour) in enumerate(COLOURS.items()):
            (root / split / name).mkdir(parents=True)
            for i, image in enumerate(coloured(colour, 32, seed * 10 + k)):
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    out = root / "classifier.safetensors"
    assert train_main(["--data-dir", str(root), "--out", str(out), "--epochs", "6", "--batch-size", "16",
                       "--width", "4", "--lr", "0.2", "--no-progress"]) == 0
    return out, root


def test_training_writes_a_classifier_that_learned(trained):
    path, _ = trained
    classifier = load_classifier(path)
    assert classifier.class_names == ("blue", "red")  # folder order
    info = json.loads(classifier.metadata["info"])
    assert info["test_accuracy"] == 1.0 and info["test_images"] == 64 and info["epochs"] == 6
    images = np.concatenate([coloured(COLOURS["blue"], 20, 5), coloured(COLOURS["red"], 20, 6)])
    assert (predict(classifier.model, images) == np.repeat([0, 1], 20)).all()


def test_score_counts_per_class(trained, tmp_path, capsys):
    """40 samples asked for as red and 20 as blue; 30 of the 'red' ones are in fact blue images."""
    path, _ = trained
    images = np.concatenate([coloured(COLOURS["red"], 10, 7), coloured(COLOURS["blue"], 30, 8),
                             coloured(COLOURS["blue"], 20, 9)])
    labels = np.array([1] * 40 + [0] * 20)  # the classes as a model named them: 0 blue, 1 red
    np.savez(tmp_path / "samples.npz", x=images, y=labels)
    model = two_class_model(tmp_path)
    assert main(["score", str(tmp_path), "--checkpoint", str(model), "--classifier", str(path)]) == 0
    report = json.loads((tmp_path / "score.json").read_text())
    assert report["recognised"] == pytest.approx(30 / 60)
    assert report["per_class"] == {"blue": {"samples": 20, "recognised": 1.0},
                                   "red": {"samples": 40, "recognised": 0.25}}
    out = capsys.readouterr().out
    assert "recognised 50.0% of 60 samples" in out and "red  25.0% of 40" in out


def test_score_matches_classes_by_name(trained, tmp_path):
    """A model whose class order differs from the classifier's: the names decide, not the indices."""
    path, _ = trained
    classifier = load_classifier(path)
    images = coloured(COLOURS["red"], 8, 3)
    assert recognition(classifier, images, np.zeros(8, np.int64), ("red", "blue")).overall == 1.0
    assert recognition(classifier, images, np.zeros(8, np.int64), ("blue", "red")).overall == 0.0


def test_fp16_file_predicts_as_the_float32_model(tmp_path):
    torch.manual_seed(0)
    model = ResNet9(8, 3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # what fp16 storage keeps
    save_classifier(tmp_path / "c.safetensors", model, ("a", "b", "c"), {"test_accuracy": 0.5})
    back = load_classifier(tmp_path / "c.safetensors")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back.model(x), model(x), atol=1e-3)


@pytest.mark.parametrize("case, message", [
    ("missing", "classifier not found"),
    ("foreign", "not a ddpm-engine classifier"),
    ("junk", "not a safetensors file"),
])
def test_bad_classifier_files_are_one_line(tmp_path, case, message):
    path = tmp_path / "c.safetensors"
    if case == "foreign":
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(2)}, path)
    elif case == "junk":
        path.write_bytes(b"\x00" * 64)
    with pytest.raises(ClassifierError, match=message):
        load_classifier(path)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 32, 32, 3), np.uint8)}, "no labelled images"),
    ({"x": np.zeros((2, 32, 32, 3), np.uint8), "y": np.array([0, 5])}, "labels outside"),
    ({"x": np.zeros((2, 16, 16, 3), np.uint8), "y": np.array([0, 1])}, "32 x 32 RGB uint8"),
])
def test_bad_samples_are_one_line(trained, tmp_path, capsys, arrays, message):
    path, _ = trained
    np.savez(tmp_path / "samples.npz", **arrays)
    model = two_class_model(tmp_path)
    assert main(["score", str(tmp_path), "--checkpoint", str(model), "--classifier", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "score.json").exists()


def test_augment_crops_and_flips_within_the_padded_image():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32) % 256
    out = augment(images.to(torch.uint8), g)
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    # A crop at offset 4 without a flip is the image itself: some draw reproduces it exactly.
    hits = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        hits += int(torch.equal(augment(images[:1].to(torch.uint8), g), images[:1] / 255))
    assert 0 < hits < 200


def test_one_cycle_learning_rate():
    assert [learning_rate(s, 8, 1.0) for s in range(8)] == [0.0, 0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]


def test_the_bundled_classifier_scores_samples_of_the_bundled_model(tmp_path, capsys):
    """The defaults: the shipped classifier (CIFAR-10's classes, its recorded test run) and the bundled model's
    class names for y."""
    classifier = load_classifier()
    assert classifier.class_names == CIFAR10_CLASSES
    assert json.loads(classifier.metadata["info"])["test_images"] == 10_000
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", x=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), y=np.arange(30) % 3)
    assert main(["score", str(tmp_path / "samples.npz")]) == 0
    report = json.loads((tmp_path / "score.json").read_text())
    assert {name: v["samples"] for name, v in report["per_class"].items()} == dict.fromkeys(CIFAR10_CLASSES[:3], 10)
