"""Train the CIFAR-10 classifier behind `ddpm-engine score` (engine.evaluation.classifier.ResNet9) on an image folder.

    python -m training.classifier --data-dir runs/data/cifar10-jpeg --out engine/weights/cifar10-classifier.safetensors

DATA_DIR holds train/ and test/, one sub-folder of images per class (what the bundled model's recipe
unpacks from the JPEG CIFAR-10 tarball). The recipe is the DAWNBench ResNet's, shortened for a CPU: SGD
with Nesterov momentum 0.9, weight decay 5e-4, batch 256, a one-cycle learning rate (linear up to the peak
over the first quarter of the steps, linear down to 0), label smoothing 0.2, random 32 x 32 crops of the
4-pixel reflect-padded image and horizontal flips; bf16 autocast on CPUs with bf16 instructions. The file
records its test accuracy (the 10,000 test images, no augmentation) and the recipe.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.apps.clitools import int_range, positive_float, reported
from engine.backends import native_cpu_bf16
from engine.evaluation.classifier import ResNet9, predict, save_classifier
from engine.evaluation.datasets import DataError
from training.data import load_folder

PROG = "python -m training.classifier"


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 32 x 32 crops of the reflect-padded batch (4 pixels), then random horizontal flips; float in [0, 1]."""
    n, _, h, w = images.shape
    padded = F.pad(images.float() / 255, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 3, h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 3, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def learning_rate(step: int, total: int, peak: float) -> float:
    """One cycle: linear 0 -> peak over the first quarter of the steps, then linear peak -> 0."""
    rise = max(1, total // 4)
    return peak * step / rise if step < rise else peak * (total - step) / max(1, total - rise)


def accuracy(model: ResNet9, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predicted = predict(model, images.permute(0, 2, 3, 1).numpy())
    model.train()
    return float((torch.from_numpy(predicted) == labels).float().mean())


def train(args) -> None:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    for split in ("train", "test"):
        if not (args.data_dir / split).is_dir():
            raise DataError(f"--data-dir {args.data_dir} must hold train/ and test/ (one sub-folder per class)")
    train_set, test_set = load_folder(args.data_dir / "train", 32), load_folder(args.data_dir / "test", 32)
    if test_set.class_names != train_set.class_names:
        raise DataError("train/ and test/ name different classes")
    model = ResNet9(args.width, train_set.num_classes).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
                          lr=0.0, momentum=0.9, nesterov=True)
    steps_per_epoch = len(train_set) // args.batch_size
    total = steps_per_epoch * args.epochs
    bf16 = args.bf16 and native_cpu_bf16()
    start, step = time.perf_counter(), 0
    with tqdm(total=total, unit="step", disable=args.no_progress) as bar:
        for epoch in range(args.epochs):
            order = torch.randperm(len(train_set), generator=g)
            for k in range(steps_per_epoch):
                index = order[k * args.batch_size:(k + 1) * args.batch_size]
                x = augment(train_set.images[index], g).contiguous(memory_format=torch.channels_last)
                for group in opt.param_groups:
                    group["lr"] = learning_rate(step, total, args.lr)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), train_set.labels[index], label_smoothing=0.2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                bar.update()
    test_accuracy = accuracy(model, test_set.images, test_set.labels)
    minutes = (time.perf_counter() - start) / 60
    info = {"test_accuracy": round(test_accuracy, 4), "test_images": len(test_set), "train_images": len(train_set),
            "epochs": args.epochs, "batch_size": args.batch_size, "peak_lr": args.lr, "width": args.width,
            "bf16_autocast": bf16, "seed": args.seed, "minutes": round(minutes, 1), "data": str(args.data_dir),
            "recipe": "python -m training.classifier " + " ".join(sys.argv[1:])}
    save_classifier(args.out, model.eval(), train_set.class_names, info)
    print(f"wrote {args.out}: test accuracy {test_accuracy:.2%} on {len(test_set)} images after {args.epochs} epochs "
          f"({minutes:.0f} min)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m training.classifier --data-dir runs/data/cifar10-jpeg "
                                       "--epochs 8 --out runs/classifier.safetensors")
    p.add_argument("--data-dir", type=Path, required=True, help="a folder with train/ and test/ image folders")
    p.add_argument("--out", type=Path, required=True, help="the classifier file to write (.safetensors)")
    p.add_argument("--epochs", type=int_range(1, 1000), default=8)
    p.add_argument("--batch-size", type=int_range(1, 4096), default=256)
    p.add_argument("--lr", type=positive_float, default=0.4, help="peak learning rate (default: 0.4)")
    p.add_argument("--width", type=int_range(1, 512), default=32, help="channels of the first layer (DAWNBench's: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 even where bf16 is native")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with reported(PROG) as outcome:
        train(args)
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
