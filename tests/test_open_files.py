"""Open file descriptors stay bounded however many S2 zones a DataLoader worker visits (a worker that kept
every zone open held two descriptors per zone: ~1,450 for the real training set, past `ulimit -n 1024`),
and a limit hit anyway is named as the machine's limit, never as a damaged file or a skipped sample.

The loader runs in a subprocess whose descriptor limit is lowered with setrlimit: real files (the synthetic
tree's rows, each given its own hard-linked S2 triple, so every row is a zone of its own)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from src.core.errors import MachineLimitError, machine_limit
from src.core.workers import open_files_limit
from src.data.sentinel import FD_RESERVE, MIN_OPEN_ZONES, zone_budget

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")

# Run in the subprocess: one sample read (lazy imports done, the first zone open), then the limit of open
# files (soft and hard, as `ulimit -n` sets them) lowered to LIMIT ("+n": the descriptors open now + n),
# then two epochs of the real loader (WORKERS persistent workers, S2 read, skip_bad on) over the index;
# what happened as one JSON line.
RUN = """
import json, os, resource, sys
import pandas as pd
from src.core.config import load_settings
from src.core.errors import one_line
from src.data.dataset import FlairDataset
from src.data.loader import build_loader

index, limit, workers = pd.read_csv(sys.argv[1], dtype={"id": str}), sys.argv[2], int(sys.argv[3])
cfg = load_settings(None, {"use_s2": True, "workers": workers, "batch_size": 4, "skip_bad": True})
ds = FlairDataset(index, cfg, train=True)
loader = build_loader(ds, cfg, train=True, persistent=True)
ds[0]
base = len(os.listdir("/proc/self/fd"))
limit = base + int(limit[1:]) if limit.startswith("+") else int(limit)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
seen = 0
try:
    for epoch in range(2):
        for batch in loader:
            seen += len(batch["id"])
except Exception as err:
    print(json.dumps({"seen": seen, "error": type(err).__name__, "message": one_line(err)}))
else:
    print(json.dumps({"seen": seen, "bad": ds.bad_count, "base": base}))
"""


def zone_per_row(index: pd.DataFrame, copies: int, folder: Path) -> pd.DataFrame:
    """`copies` times the rows of `index`, each row with its own S2 triple (hard links to the row's files)."""
    rows = []
    for k in range(copies):
        for row in index.to_dict("records"):
            zone = folder / f"{k}_{row['id']}"
            zone.mkdir(parents=True)
            for col in ("s2_data", "s2_masks", "s2_products"):
                link = zone / Path(row[col]).name
                os.link(row[col], link)
                row = {**row, col: str(link)}
            rows.append(row)
    return pd.DataFrame(rows)


def run_loader(index: pd.DataFrame, limit: str, workers: int, tmp_path: Path) -> dict:
    path = tmp_path / "index.csv"
    index.to_csv(path, index=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-c", RUN, str(path), limit, str(workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its workers too can be killed as one group
    try:  # a worker out of descriptors can hang the loader rather than fail (seen before the fix)
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the loader hung for 3 minutes under the lowered descriptor limit")
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


LIMIT = FD_RESERVE + 64  # room for 32 zones


@pytest.fixture(scope="module")
def many_zones(synth_index, tmp_path_factory) -> pd.DataFrame:
    """Every synthetic training row 12 times, each a zone of its own: more zones than LIMIT allows open."""
    index = zone_per_row(synth_index["train"], 12, tmp_path_factory.mktemp("zones"))
    assert 2 * index["s2_data"].nunique() > LIMIT + 64  # keeping every zone open would fail
    return index


def test_a_worker_visiting_more_zones_than_the_descriptor_limit_allows_finishes(many_zones, tmp_path):
    result = run_loader(many_zones, str(LIMIT), 2, tmp_path)
    assert "error" not in result and result["bad"] == 0, result
    assert result["seen"] == 2 * (len(many_zones) // 4 * 4)  # two epochs, last incomplete batch dropped


def test_a_descriptor_limit_hit_anyway_is_named_as_such(many_zones, tmp_path):
    """skip_bad is on: a machine limit must stop the run, not turn every sample into a "bad" one. One free
    descriptor: enough to read a TIFF, not to map a zone's array (np.load holds one, its map another)."""
    result = run_loader(many_zones, "+1", 0, tmp_path)
    assert result["error"] == "MachineLimitError", result
    assert ".npy: too many open files in this process (limit" in result["message"]
    assert "not a damaged file" in result["message"] and "ulimit -n" in result["message"]


def test_machine_limits_are_told_apart_from_damaged_files():
    import errno

    assert "out of memory" in str(machine_limit(MemoryError(), "x.npy"))
    assert "table of open files is full" in str(machine_limit(OSError(errno.ENFILE, "full"), "x.tif"))
    assert isinstance(machine_limit(OSError(errno.EMFILE, "too many"), "x.tif"), MachineLimitError)
    assert machine_limit(OSError(errno.EIO, "I/O error"), "x.tif") is None
    assert machine_limit(ValueError("bad header"), "x.npy") is None


def test_a_job_says_the_limit_in_one_line_and_exits_1(capsys):
    import errno

    from src.core.errors import exit_on_machine_limit

    with pytest.raises(SystemExit) as stop:
        exit_on_machine_limit("train", OSError(errno.EMFILE, "Too many open files"))
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("train: error: too many open files in this process") and err.count("\n") == 1
    with pytest.raises(OSError, match="I/O"):  # anything else goes on up unchanged
        exit_on_machine_limit("train", OSError(errno.EIO, "I/O error"))


def test_the_zone_budget_follows_the_limit_of_open_files():
    """The soft limit is raised to the hard one (no privilege needed); the budget keeps FD_RESERVE free."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert open_files_limit() == (1 << 20 if hard == resource.RLIM_INFINITY else hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        assert zone_budget() == max(MIN_OPEN_ZONES, (open_files_limit() - FD_RESERVE) // 2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
