"""Export trained checkpoints for deployment: a slim weights-only checkpoint and an ONNX model, both checked.

    python -m src.export --runs RUNS_DIR_OR_CKPTS... [--dtype fp16|bf16] [--no-onnx] [--size 512]

For every checkpoint (every best.pt under a run folder, or the files given) it writes, beside it:
- `<stem>.slim.pt`: the inference weights ("model") cast to fp16 (or bf16), the "config" and a small
  "meta" dict -- no optimizer, raw weights, EMA copy or history, so it is a fraction of best.pt's size.
  It loads through the same `load_for_inference` as best.pt (load_state_dict copies the half-precision
  tensors into the float32 parameters), so `make predict RUNS=.../best.slim.pt` and `make infer` run from
  it. A tensor that would overflow fp16 is kept in float32.
- `<stem>.onnx` (opset 18, torch.onnx dynamo exporter): see `OnnxModel` for its inputs. It embeds the
  input normalisation, so a user of the ONNX file feeds raw band values and needs none of the kit's
  statistics.
Each file is checked on CPU before the command reports success: the slim checkpoint is reloaded and its
logits compared with best.pt's, the ONNX model is run with onnxruntime and compared with PyTorch; the
maximum absolute differences of the logits and the three file sizes are printed.
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
