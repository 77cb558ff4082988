"""Benchmarks that print figures: ``python -m efficientml.bench loader [--dataset ...]``.

Speed targets are checked here, by figures a person reads, not by timed tests.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .data import DATASETS, TensorLoader, data_root, load_dataset
from .train import select_device


def _images_per_second(loader, epochs: int, device) -> float:
    """Iterate ``loader`` for ``epochs`` epochs, moving each batch to ``device``; images per second."""
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            n += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def bench_loader(dataset: str = "fashion-mnist", batch_size: int = 128, epochs: int = 1,
                 workers: int = 2, device=None) -> dict:
    """One training epoch's batches with augmentation: TensorLoader vs torchvision's DataLoader.

    The DataLoader runs the usual per-image pipeline: RandomCrop(padding) and
    RandomHorizontalFlip on PIL images, ToTensor, Normalize, in ``workers`` worker processes.
    """
    from torchvision import transforms

    device = select_device(device)
    ds = load_dataset(dataset, train=True)
    spec = DATASETS[ds.name]
    tfm = [transforms.RandomCrop(ds.shape[1], padding=spec.crop_padding)]
    if spec.hflip:
        tfm.append(transforms.RandomHorizontalFlip())
    tfm += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    tv = spec.tv_class(str(data_root()), train=True, transform=transforms.Compose(tfm))
    dl = torch.utils.data.DataLoader(tv, batch_size=batch_size, shuffle=True, num_workers=workers,
                                     pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    ours = TensorLoader(ds, batch_size, shuffle=True, augment=True, device=device)
    _images_per_second(ours, 1, device)  # warm-up (allocations, the device copy is in __init__)
    return {"dataset": ds.name, "images": len(ds), "batch_size": batch_size, "device": str(device),
            "workers": workers, "tensor_loader": _images_per_second(ours, epochs, device),
            "torchvision_dataloader": _images_per_second(dl, epochs, device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m efficientml.bench", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("loader", help="TensorLoader vs torchvision DataLoader, images per second")
    b.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--epochs", type=int, default=1)
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--device", default=None)
    a = p.parse_args(argv)
    try:
        r = bench_loader(a.dataset, a.batch_size, a.epochs, a.workers, a.device)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{r['dataset']}: {r['images']} training images, batch {r['batch_size']}, with augmentation, "
          f"on {r['device']}, torch threads {torch.get_num_threads()}")
    print(f"  TensorLoader (batched on the device)          {r['tensor_loader']:>10,.0f} images/s")
    print(f"  torchvision DataLoader ({r['workers']} workers, PIL transforms) {r['torchvision_dataloader']:>10,.0f} images/s")
    print(f"  speed-up: {r['tensor_loader'] / r['torchvision_dataloader']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
