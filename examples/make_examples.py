"""Write the example inputs in examples/synthetic/ with dermtool's own generator.

ISIC images may not be redistributed, so the examples are synthetic lesion-like images drawn
by `dermtool.synthetic` (their masks and labels are exact by construction). They show the
file layout and let `dermtool infer` run out of the box; they are not dermoscopy photographs,
so do not judge the model's accuracy on them.

    python examples/make_examples.py            # rewrites examples/synthetic/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dermtool.synthetic import write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "synthetic")
    parser.add_argument("-n", type=int, default=6)
    parser.add_argument("--seed", type=int, default=2017)
    args = parser.parse_args()
    write_dataset(args.out, args.n, rng_seed=args.seed, sizes=[(450, 600), (768, 1024), (600, 600)],
                  formats=("jpg",))
    print(f"wrote {args.n} synthetic images, masks and labels.csv to {args.out}")


if __name__ == "__main__":
    main()
