"""Exploratory data analysis of FLAIR #2 (real or synthetic): executes notebooks/eda.ipynb headlessly.

    python -m src.eda [--data DATA] [--out notebooks/out]        (make eda EDA_DATA=DATA)

DATA is a folder holding index_train.csv / index_test.csv (+ optionally folds.csv and class_hist.csv,
written by `make index` / `make folds`), or a raw data root (the index is then built in memory). The
executed notebook goes to OUT/eda.ipynb, its HTML export to OUT/eda.html, every figure to OUT/figures/.

The notebook only calls the analysis modules (src.analysis.common, eda_classes, eda_images, eda_s2,
eda_s2_plots, eda_meta, eda_prose, eda_display): short cells, nothing computed twice, the analysis tested
like the rest of the kit, and conclusions generated from the numbers. This module only runs it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from src.core.files import write_text

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "eda.ipynb"
DEFAULT_OUT = REPO / "notebooks" / "out"
# Every figure the notebook writes (tests check them; class_folds.png only when folds.csv exists).
FIGURES: tuple[str, ...] = (
    "class_split.png", "class_domains.png", "class_folds.png", "patch_grid.png", "band_stats.png",
    "s2_thumbnails.png", "s2_cover.png", "s2_monthly.png", "s2_ndvi_classes.png", "metadata.png", "map.png",
)


def inject_parameters(nb, params: dict) -> None:
    """Insert a cell setting `params` right after the cell tagged "parameters" (papermill's convention),
    so the executed notebook shows the values used; any earlier injected cell is replaced."""
    import nbformat

    cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    at = next((i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if at is None:
        raise ValueError("notebook has no cell tagged 'parameters'")
    lines = [f"{k} = {v!r}" for k, v in params.items()]
    source = "\n".join(["# Parameters injected by `python -m src.eda`", *lines])
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cells.insert(at + 1, cell)
    nb.cells = cells


def _venv_kernel_manager_class():
    """AsyncKernelManager that only sees ipykernel's own "python3" spec, which launches sys.executable (the
    venv's python), never a user-level or system "python3" kernelspec pointing at another interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class VenvKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _venv_kernel_spec_manager(self) -> KernelSpecManager:
            return KernelSpecManager(kernel_dirs=[])

    return VenvKernelManager


def run_notebook(data: str | os.PathLike, out: str | os.PathLike = DEFAULT_OUT,
                 notebook: str | os.PathLike = NOTEBOOK, params: dict | None = None, timeout: int = 900,
                 html: bool = True) -> tuple[Path, Path | None]:
    """Execute the notebook on `data` with nbclient in a kernel running this interpreter (the venv's), then
    write OUT/eda.ipynb and OUT/eda.html. Figures go to OUT/figures. On a failing cell the partly executed
    notebook is still written (for reading the traceback) and the error is raised."""
    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(str(notebook), as_version=4)
    values = {"DATA": str(Path(data).resolve()), "FIGURES": str(out / "figures"), "CACHE": str(out / "cache")}
    values.update(params or {})
    inject_parameters(nb, values)
    ipynb = out / f"{Path(notebook).stem}.ipynb"
    with tempfile.TemporaryDirectory(prefix="eda-kernel-") as sockets:
        # IPC sockets in a temp folder: local only, nothing left behind.
        config = Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(sockets, "kernel")}})
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", config=config,
                                kernel_manager_class=_venv_kernel_manager_class(),
                                resources={"metadata": {"path": str(REPO)}})
        try:
            client.execute()
        finally:
            write_text(ipynb, nbformat.writes(nb))
    html_path = None
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nb)
        html_path = out / f"{Path(notebook).stem}.html"
        write_text(html_path, body)
    return ipynb, html_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Execute notebooks/eda.ipynb headlessly into OUT (+ HTML).")
    p.add_argument("--data", default="data",
                   help="folder with index_train.csv (+ folds.csv), or a raw data root")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (eda.ipynb, eda.html, figures/)")
    p.add_argument("--notebook", default=str(NOTEBOOK))
    p.add_argument("--images", type=int, default=None, help="aerial patches sampled (notebook default 48)")
    p.add_argument("--s2", type=int, default=None, help="patches sampled for S2 statistics (default 150)")
    p.add_argument("--masks", type=int, default=None, help="masks counted per split without class_hist.csv")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--no-html", action="store_true")
    args = p.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        print(f"eda: error: {data}: data folder not found (a folder with index_train.csv, or a raw data "
              "root; e.g. make synth index, then make eda EDA_DATA=data)", file=sys.stderr)
        return 1
    params = {k: v for k, v in (("N_IMAGES", args.images), ("N_S2", args.s2), ("N_MASKS", args.masks),
                                ("SEED", args.seed)) if v is not None}
    if not (data / "index_train.csv").is_file():
        print(f"eda: no index_train.csv in {data}: indexing it as a raw data root in memory (slow on the "
              "real data; `make index` writes the index once)", flush=True)
    start = time.perf_counter()
    try:
        ipynb, html = run_notebook(data, args.out, args.notebook, params, args.timeout, not args.no_html)
    except Exception as err:
        from nbclient.exceptions import CellExecutionError

        cell_error = isinstance(err, CellExecutionError)
        what = f"{err.ename}: {err.evalue}" if cell_error else f"{type(err).__name__}: {err}"
        print(f"eda: error: {what}", file=sys.stderr)
        print(f"eda: the partly executed notebook (with the traceback) is "
              f"{Path(args.out) / (Path(args.notebook).stem + '.ipynb')}", file=sys.stderr)
        return 1
    print(f"eda: {ipynb}" + (f", {html}" if html else "") + f", figures in {Path(args.out) / 'figures'} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
