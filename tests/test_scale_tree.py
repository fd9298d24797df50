"""bench/scale_tree.py: a small (--scale 0.002) hard-linked tree passes the real index with --check, with
the expected counts, unique ids, shared inodes and every centroid inside its super-area; the full-size plan
has the real counts."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from src.prep.index_scan import scan

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("scale_tree", REPO / "bench" / "scale_tree.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_tree"] = module
    spec.loader.exec_module(module)
    return module


st = _load_script()
SMALL = st.TreeSpec(scale=0.002, seed=1, pool=4, s2_per_year=1, s2_side=80, s2_dates=8)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("scale") / "tree"
    stats = st.build_tree(root, SMALL, workers=1)
    return root, stats


def test_small_tree_passes_the_index_with_check(small_tree):
    root, stats = small_tree
    report = scan(root, check=True, workers=2)
    assert report.fatal == [] and report.problems == [], [str(p) for p in report.problems[:5]]
    train, test = report.frames["train"], report.frames["test"]
    # 0.002 x (61,712 | 16,050) patches; zones raised to one per domain (40 | 10).
    assert (len(train), len(test)) == (123, 32)
    assert (train["domain"].nunique(), test["domain"].nunique()) == (40, 10)
    assert (train.groupby(["domain", "zone"]).ngroups, test.groupby(["domain", "zone"]).ngroups) == (40, 10)
    assert set(train["domain"]) == set(st.TRAIN_DOMAINS) and set(test["domain"]) == set(st.TEST_DOMAINS)
    assert stats["splits"]["train"]["patches"] == 123 and stats["splits"]["test"]["zones"] == 10
    ids = list(train["id"]) + list(test["id"])
    assert len(set(ids)) == len(ids) and all(len(i) == 6 and i.isdigit() for i in ids)
    assert (test["msk_path"] != "").all() and test["camera"].str.len().gt(0).all()


def test_files_are_hard_links_to_a_small_pool(small_tree):
    root, stats = small_tree
    df = scan(root).frames["train"]
    inodes = {os.stat(p).st_ino for p in df["img_path"]}
    assert len(inodes) == SMALL.pool == stats["distinct_img_msk_pairs"]
    a, b = df["img_path"].iloc[0], df["img_path"].iloc[SMALL.pool]  # pool pairs are taken in turn
    assert a != b and os.path.samefile(a, b) and os.stat(a).st_nlink > 1
    assert len({os.stat(p).st_ino for p in df["s2_data"]}) <= stats["distinct_s2_triples"]
    # links cost directory entries, not inodes: every IMG, MSK and S2 name in the tree is an extra link
    assert stats["entries"] - stats["inodes"] == 2 * 155 + 3 * 50


def test_every_centroid_lies_inside_its_super_area(small_tree):
    root, _ = small_tree
    centroids = json.loads((root / st.CENTROIDS_JSON).read_text())
    meta = json.loads((root / st.METADATA_JSON).read_text())
    report = scan(root)
    for df in report.frames.values():
        assert len(df) and not df[["s2_row", "s2_col"]].eq(-1).any().any()
        for (_, _, data), zone in df.groupby(["domain", "zone", "s2_data"]):
            t, bands, h, w = np.load(data, mmap_mode="r").shape
            assert bands == 10 and t >= 2
            cells = list(zip(zone["s2_row"], zone["s2_col"]))
            assert len(set(cells)) == len(cells)  # distinct centroids within a zone
            assert all(0 <= r < h and 0 <= c < w for r, c in cells)
        for row in df.itertuples():
            assert centroids[f"IMG_{row.id}.tif"] == [row.s2_row, row.s2_col]
            assert (meta[f"IMG_{row.id}"]["domain"], meta[f"IMG_{row.id}"]["zone"]) == (row.domain, row.zone)


def test_rebuild_and_refusal(small_tree, tmp_path):
    root, _ = small_tree
    marker = json.loads((root / st.MARKER).read_text())
    assert marker["complete"] and marker["spec"]["scale"] == SMALL.scale
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not a tree")
    with pytest.raises(SystemExit, match="refusing"):
        st.build_tree(other, SMALL)
    assert (other / "keep.txt").exists()


def test_full_size_plan_has_the_real_counts():
    spec = st.TreeSpec()
    zones = st.plan_zones(spec, st.variant_shapes(spec))
    assert len(zones) == 916
    for split, (n_domains, n_patches) in {"train": (40, 61_712), "test": (10, 16_050)}.items():
        sizes = [z.size for z in zones if z.split == split]
        assert len({z.domain for z in zones if z.split == split}) == n_domains
        assert sum(sizes) == n_patches and min(sizes) >= 20 and max(sizes) <= 200
    ids = [i for z in zones for i in z.ids]
    assert len(ids) == len(set(ids)) == 77_762
    assert all(len(z.cells) == len(set(z.cells)) == z.size for z in zones)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to see the worker processes")
def test_ctrl_c_during_the_check_is_one_line_from_the_job_and_none_from_its_workers(small_tree, tmp_path):
    """Ctrl-C reaches the whole process group (the job and its checking processes, even those still starting):
    one line saying nothing was written, exit 130, no traceback anywhere, no CSV."""
    import signal
    import subprocess
    import time

    root, _ = small_tree
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "src.index", "--root", str(root), "--out", str(tmp_path / "data"), "--check",
           "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    end = time.monotonic() + 120
    while not _children(proc.pid) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.005)  # the pool starts: interrupt while its workers are still importing
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out + err)[-2000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("index: interrupted: nothing written")
    assert not list((tmp_path / "data").glob("index_*.csv"))
