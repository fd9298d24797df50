"""Write a synthetic FLAIR #2 dataset in the real layout (`make synth`): learnable, honest data for every
check that must run without the real 100 GB. The truth: src.prep.synth_scene; the pixels and the files:
src.prep.synth_write.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from src.prep.synth_scene import PHENOLOGIES
from src.prep.synth_write import INTERLEAVES, LAYOUTS, SynthSpec, make_dataset


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a synthetic FLAIR #2 dataset in the real layout.")
    p.add_argument("--out", required=True, help="output root folder")
    p.add_argument("--train-domains", type=int, default=10,
                   help="training domains (10: enough for make folds' default K=5, two domains per fold)")
    p.add_argument("--test-domains", type=int, default=2)
    p.add_argument("--zones", type=int, default=2, help="zones per domain")
    p.add_argument("--patches", type=int, default=4, help="patches per zone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=LAYOUTS, default="official")
    p.add_argument("--interleave", choices=INTERLEAVES, default="planar",
                   help="storage order of the aerial images")
    p.add_argument("--no-test-labels", action="store_true", help="do not write the test labels")
    p.add_argument("--phenology", choices=PHENOLOGIES, default="smooth",
                   help="S2 signal: smooth (the default, the kit's figures before issue 28) or events (short "
                        "dated events, a rare S2-only class, mowing, calendar shifts, cloudy months)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel processes (zones are written independently)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    start = time.perf_counter()
    spec = SynthSpec(args.train_domains, args.test_domains, args.zones, args.patches, args.seed, args.layout,
                     args.interleave, not args.no_test_labels, phenology=args.phenology)
    root = make_dataset(args.out, spec, workers=args.workers)
    n = (args.train_domains + args.test_domains) * args.zones * args.patches
    print(f"synthetic FLAIR #2 ({args.layout} layout, {args.phenology} phenology): {n} patches, "
          f"{(args.train_domains + args.test_domains) * args.zones} zones -> {root} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
