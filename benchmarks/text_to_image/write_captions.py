"""Write captioned Fashion-MNIST as a Hugging Face ``imagefolder`` (``images/<i>.png`` + ``metadata.jsonl``).

    python -m benchmarks.text_to_image.write_captions --out runs/text_to_image/data [--split train] [--limit N]

The images and captions are exactly the teacher's (:func:`train_teacher.load_data`): Fashion-MNIST
padded to ``--image-size``, grey copied to RGB, stored as uint8 u = round((x + 1) 127.5), captions
"a photo of a {class}" with the same seeded tenth empty. This is the data format text-to-image
distillation reads (``pd_core/data/captions.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.text_to_image.components import Sizes
from benchmarks.text_to_image.train_teacher import TeacherConfig, load_data
from pd_core.data.class_captions import write_caption_folder

MAX_IMAGES = 70_000


def write(out: Path, *, split: str, limit: int | None, image_size: int = 32, seed: int = 0,
          data_url: str | None = None) -> int:
    """Write the first ``limit`` images of ``split`` with their captions under ``out``; returns how many."""
    cfg = TeacherConfig(sizes=Sizes(image_size=image_size), data_limit=limit, seed=seed)
    images, captions = load_data(cfg, data_url=data_url, split=split)
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    write_caption_folder(uint8, captions, str(out))
    return len(captions)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--limit", type=int, default=None, help=f"first N images (at most {MAX_IMAGES})")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-url", default=None)
    args = p.parse_args(argv)
    if args.limit is not None and not 1 <= args.limit <= MAX_IMAGES:
        print(f"write_captions: --limit must lie in [1, {MAX_IMAGES}]; got {args.limit}", file=sys.stderr)
        return 2
    try:
        n = write(args.out, split=args.split, limit=args.limit, image_size=args.image_size, seed=args.seed,
                  data_url=args.data_url)
    except ValueError as err:
        print(f"write_captions: {err}", file=sys.stderr)
        return 2
    print(f"wrote {n} captioned images to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
