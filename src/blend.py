"""Search an ensemble recipe on out-of-fold predictions: `make ensemble ENSEMBLE_RUNS="runs/a runs/b"`.

    python -m src.blend --runs runs/a runs/b [runs/c ...] --out recipes/recipe.json [--data DATA]
        [--tta auto|none|flip|d4] [--checkpoint last|best] [--pixels auto|N] [--seed 0]
        [--no-choice] [--no-biases] [--threads 8] [--foldall]

Each run is a folder of K fold runs of one config, whose `fold<k>/oof*/` stores (src.ensembling.oof) hold
every training patch once, predicted by the fold model that did not train on it. The pipeline is
src.ensembling.blend; the search (src.ensembling.search) maximises the official OOF mIoU over the run weights,
a per-class choice of one run (2nd place), the TTA level among those stored by every run, and per-class
biases, on a fixed pixel subsample (src.ensembling.search says why and how big). Against overfitting it also
fits on half of the domains and scores the other half (and the swap), next to the best single run and the
plain mean. The chosen recipe is then scored on every pixel, per class and per domain, and written as JSON
(src.ensembling.recipe) for `make submit RECIPE=recipes/recipe.json` (`python -m src.predict --recipe
recipes/recipe.json`), which applies the fold models of those stores (a run's `foldall/` model only with
--foldall). Outputs: the recipe, `<stem>_domains.csv` (every run, the mean and the recipe, per domain) and
`<stem>_domains.png` (the recipe). Docs: docs/recipes.md, "Out-of-fold ensembling".
"""
from __future__ import annotations

import argparse
import sys

from src.core.errors import DataError, PredictError, exit_interrupted, one_line
from src.core.settings import OOF_CHECKPOINTS, TTA_LEVELS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m src.blend", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run folders with fold<k>/oof*/ stores")
    ap.add_argument("--out", default="recipes/recipe.json", help="the recipe JSON (tables written beside it)")
    ap.add_argument("--data", help="data folder with index_train.csv and folds.csv (default: the stores')")
    ap.add_argument("--tta", default="auto", choices=["auto", *TTA_LEVELS],
                    help="TTA level of the stores to use; auto: the best among those every run stored")
    ap.add_argument("--checkpoint", default="last", choices=OOF_CHECKPOINTS, help="stores of last/best.pt")
    ap.add_argument("--pixels", default="auto",
                    help="sampled pixels per patch for the search (auto: 128, or more on small sets)")
    ap.add_argument("--seed", type=int, default=0, help="pixel sample and domain halves")
    ap.add_argument("--no-choice", dest="choice", action="store_false", help="no per-class run choice")
    ap.add_argument("--no-biases", dest="biases", action="store_false", help="no per-class biases")
    ap.add_argument("--threads", type=int, default=8, help="threads reading the PROB files")
    ap.add_argument("--foldall", action="store_true", help="the recipe also applies each run's foldall/ "
                    "model (trained on every domain; it has no OOF store, so no figure covers it)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.pixels != "auto" and (not str(args.pixels).isdigit() or int(args.pixels) < 1):
        print(f"blend: error: --pixels must be auto or a number >= 1, got {args.pixels!r}", file=sys.stderr)
        raise SystemExit(2)
    try:
        from src.ensembling.blend import BlendOptions, blend

        opts = BlendOptions(args.data, args.tta, args.checkpoint, args.pixels, args.seed, args.choice,
                            args.biases, args.threads, args.foldall)
        blend(args.runs, args.out, opts)
    except KeyboardInterrupt:
        exit_interrupted("blend", f"no recipe written to {args.out}", "re-run the same command")
    except (PredictError, DataError) as err:
        print(f"blend: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
