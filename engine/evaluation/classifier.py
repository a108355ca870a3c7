"""Recognition: the fraction of samples a CIFAR-10 classifier assigns to the class they were sampled for,
per class and overall (`ddpm-engine score`). FID says how far the samples are from the data as a whole;
this says which classes a class-conditional model has not learned yet.

The classifier is our own: a ResNet-9-shaped network (Page's DAWNBench CIFAR-10 ResNet, widths halved),
trained by `python -m training.classifier` on the 50,000 JPEG training images and shipped as
`engine/weights/cifar10-classifier.safetensors` (fp16) with its class names, width and test accuracy in
the metadata. One file, read without unpickling, like the diffusion checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from engine.errors import UserError
from engine.formats.checkpoint import atomic_write, safetensors_header

FORMAT = "ddpm-engine-classifier/1"
BUNDLED_CLASSIFIER = Path(__file__).parents[1] / "weights" / "cifar10-classifier.safetensors"
# Per-channel statistics of the CIFAR-10 training images (0..1 scale); inputs are standardised with them.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class ClassifierError(UserError):
    """A classifier file that is missing, unreadable or foreign, or images it cannot score."""


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """prep (w) -> layer1 (2w, pool, residual) -> layer2 (4w, pool) -> layer3 (8w, pool, residual) ->
    global max pool -> linear, logits scaled by 1/8. Input: float images in [0, 1], N x 3 x 32 x 32."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.width, self.num_classes = width, num_classes
        w = width
        self.net = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w, pool=True), Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True),
            conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes, bias=False))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std) * 0.125


@dataclass
class Classifier:
    model: ResNet9
    class_names: tuple[str, ...]
    metadata: dict[str, str]


def save_classifier(path: str | os.PathLike, model: ResNet9, class_names: tuple[str, ...],
                    info: dict[str, object], dtype: torch.dtype = torch.float16) -> None:
    """Write atomically: the weights in `dtype` (BatchNorm statistics included), the width, the class
    names and `info` (test accuracy, recipe) in the metadata."""
    tensors = {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
               for name, t in model.state_dict().items()}
    metadata = {"format": FORMAT, "width": str(model.width), "class_names": json.dumps(list(class_names)),
                "info": json.dumps(info)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_classifier(path: str | os.PathLike = BUNDLED_CLASSIFIER) -> Classifier:
    """The classifier in `path`, in float32 eval mode; one ClassifierError line for anything wrong with the file."""
    path = Path(path)
    try:
        metadata, _, _ = safetensors_header(path, "classifier")
    except UserError as e:
        raise ClassifierError(str(e)) from None
    if metadata.get("format") != FORMAT:
        raise ClassifierError(f"{path} is not a ddpm-engine classifier (no '{FORMAT}' metadata)")
    try:
        width = int(metadata["width"])
        class_names = tuple(json.loads(metadata["class_names"]))
        if not 1 <= width <= 512 or not class_names or not all(isinstance(c, str) for c in class_names):
            raise ValueError("out of range")
        model = ResNet9(width, len(class_names))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()})
    except (KeyError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClassifierError(f"{path}: not a readable classifier ({reason})") from None
    return Classifier(model.eval(), class_names, metadata)


@torch.no_grad()
def predict(model: ResNet9, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted class of each uint8 N x H x W x 3 image (32 x 32), in batches (bounded memory)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        out.append(model(x.float() / 255).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass
class Recognition:
    overall: float                       # fraction of all samples predicted as their class
    per_class: dict[str, tuple[int, float]]  # class -> (samples, fraction recognised)


def recognition(classifier: Classifier, images: np.ndarray, labels: np.ndarray,
                class_names: tuple[str, ...] | None = None) -> Recognition:
    """How many samples of each requested class the classifier recognises as that class. `class_names`:
    the names of the samples' labels (the diffusion model's classes), matched to the classifier's by name."""
    names = class_names or classifier.class_names
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise ClassifierError(f"the classifier scores 32 x 32 RGB uint8 images, not {images.dtype} {images.shape[1:]}")
    if labels.shape != (len(images),) or len(labels) == 0:
        raise ClassifierError("scoring needs one class label per image (samples.npz 'y')")
    if labels.min() < 0 or labels.max() >= len(names):
        raise ClassifierError(f"labels outside 0..{len(names) - 1}")
    unknown = sorted(set(names[i] for i in np.unique(labels)) - set(classifier.class_names))
    if unknown:
        raise ClassifierError(f"the classifier does not know the class(es) {', '.join(unknown)}")
    # The classifier's index of each of the model's classes (-1: unknown, and absent from labels).
    index = np.array([classifier.class_names.index(n) if n in classifier.class_names else -1 for n in names])
    hit = predict(classifier.model, images) == index[labels]
    per_class = {names[i]: (int((labels == i).sum()), float(hit[labels == i].mean()))
                 for i in range(len(names)) if (labels == i).any()}
    return Recognition(float(hit.mean()), per_class)
