"""Export trained checkpoints for deployment: a slim weights-only checkpoint and an ONNX model, both checked.

    python -m src.export --runs RUNS_DIR_OR_CKPTS... [--dtype fp16|bf16] [--no-onnx] [--size 512]

Beside every best.pt under a run folder (or each file given): `<stem>.slim.pt` and `<stem>.onnx`, each
checked on CPU against the checkpoint before the command reports success (src.deploy.export says how).
"""
from __future__ import annotations

import argparse
import sys

from src.core.errors import one_line
from src.core.flair import PATCH_SIZE
from src.core.settings import SLIM_DTYPES


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m src.export", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run folders (best.pt under them) or files")
    ap.add_argument("--dtype", choices=SLIM_DTYPES, default="fp16", help="slim weights (default fp16)")
    ap.add_argument("--no-onnx", dest="onnx", action="store_false", help="only the slim checkpoint")
    ap.add_argument("--size", type=int, default=PATCH_SIZE, help="image side of the example/check inputs")
    args = ap.parse_args(argv)
    try:
        from src.deploy.export import export

        export(args.runs, args.dtype, args.onnx, args.size)
    except ValueError as err:  # CheckpointError, DataError, bad settings
        print(f"export: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
