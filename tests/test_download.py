"""src.download against a local HTTP server serving real zips of a small synthetic FLAIR #2 tree.

No internet: a ThreadingHTTPServer on 127.0.0.1 serves the zips with Range support, records every
request (path, first byte asked) and every byte sent, and can drop a connection mid-file or answer
503 once. Backoff is 0 so retries cost no time.
"""
from __future__ import annotations

import hashlib
import threading
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from src import download as dl
from src.core.errors import DiskSpaceError
from src.core.tables import load_index
from src.prep import download as disk_space
from src.prep.archives import (
    SUBSETS,
    ZIPS,
    Mirror,
    ZipSpec,
    download,
    download_hf,
    extract_tree,
    is_extracted,
    marker_path,
    select,
)
from src.prep.download import Transfer, human
from src.prep.index_scan import build_index
from src.prep.synth_write import SynthSpec, make_dataset

TOPS = {  # zip name -> what it holds in the synthetic tree (the official layout)
    "flair_aerial_train.zip": ["flair_aerial_train"],
    "flair_sen_train.zip": ["flair_sen_train"],
    "flair_labels_train.zip": ["flair_labels_train"],
    "flair_2_aerial_test.zip": ["flair_2_aerial_test"],
    "flair_2_sen_test.zip": ["flair_2_sen_test"],
    "flair_2_labels_test.zip": ["flair_2_labels_test"],
    "flair_2_aerial_metadata.zip": ["flair-2_aerial_metadata.json"],
    "flair_2_centroids_sp_to_patch.zip": ["flair-2_centroids_sp_to_patch.json"],
}


def _zip_tree(root: Path, tops: list[str], dest: Path, stored: bool = False) -> bytes:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                         compresslevel=None if stored else 1) as zf:
        for top in tops:
            path = root / top
            for f in sorted([path] if path.is_file() else path.rglob("*")):
                zf.write(f, f.relative_to(root).as_posix())
    return dest.read_bytes()


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> dict[str, bytes]:
    """The eight official zips (toy excepted) built from a 1-train + 1-test domain synthetic tree."""
    base = tmp_path_factory.mktemp("dlsrc")
    root = make_dataset(base / "tree", SynthSpec(train_domains=1, test_domains=1, zones=1, patches=2, seed=3))
    return {name: _zip_tree(root, tops, base / name) for name, tops in TOPS.items()}


class _State:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, int]] = []  # (file name, first byte asked)
        self.sent: dict[str, int] = {}             # body bytes written per file
        self.drop_after: dict[str, int] = {}       # close the connection after N body bytes (once)
        self.fail_once: set[str] = set()           # answer 503 once
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server naming)
        st: _State = self.server.state
        name = urllib.parse.unquote(self.path.rsplit("/", 1)[-1])
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        with st.lock:
            st.requests.append((name, start))
            fail = name in st.fail_once
            st.fail_once.discard(name)
            drop = st.drop_after.pop(name, None)
        if fail:
            self.send_error(503, "busy")
            return
        data = st.files.get(name)
        if data is None:
            self.send_error(404)
            return
        if rng and start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop is not None:
            body = body[:drop]
            self.close_connection = True
        self.wfile.write(body)
        with st.lock:
            st.sent[name] = st.sent.get(name, 0) + len(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(base_url, state); put files in state.files."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = _State({})
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/some/mirror/", httpd.state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def plenty_of_space(monkeypatch):
    """The real table says 94 GB; pretend the disk is huge so the synthetic run is not refused."""
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 10**15)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _table(names: list[str], zips: dict[str, bytes], md5: bool = True) -> dict[str, ZipSpec]:
    return {n: ZipSpec(n, len(zips[n]), _md5(zips[n]) if md5 else None, 3.0, ("train",)) for n in names}


def _cli(url: str, raw: Path, data: Path, zips: dict[str, bytes], *extra: str) -> list[str]:
    md5s = [a for n in TOPS for a in ("--md5", f"{n}={_md5(zips[n])}")]
    return ["--subset", "all", "--out", str(raw), "--source", "ovh", "--index-out", str(data),
            "--base-url", url, "--backoff", "0", *md5s, *extra]


def test_tables_and_subsets():
    names = {s: {z.name for z in select(s)} for s in SUBSETS}
    aux = {"flair_2_aerial_metadata.zip", "flair_2_centroids_sp_to_patch.zip"}
    assert names["toy"] == {"flair_2_toy_dataset.zip"}
    assert names["aux"] == aux
    assert names["train"] == {"flair_aerial_train.zip", "flair_sen_train.zip", "flair_labels_train.zip"} | aux
    test = {"flair_2_aerial_test.zip", "flair_2_sen_test.zip", "flair_2_labels_test.zip"}
    assert names["test"] == test | aux
    assert names["all"] == names["train"] | names["test"]
    assert all(len(z.md5) == 32 for z in ZIPS.values() if z.md5)
    with pytest.raises(ValueError, match="unknown subset"):
        select("everything")


def test_full_download_extract_and_index(server, zips, tmp_path, plenty_of_space, capsys):
    url, st = server
    st.files.update(zips)
    raw, data = tmp_path / "raw", tmp_path / "data"
    assert dl.main(_cli(url, raw, data, zips)) == 0
    out = capsys.readouterr().out
    assert sorted(n for n, _ in st.requests) == sorted(TOPS)  # one request per zip, toy not asked
    assert all(start == 0 for _, start in st.requests)
    for name, tops in TOPS.items():
        assert (raw / name).read_bytes() == zips[name]  # kept (--keep-zips 1), identical
        assert marker_path(raw, name).is_file()
        assert all((raw / t).exists() for t in tops)
        assert not (raw / (name + ".part")).exists()
    assert not list(raw.glob(".tmp-extract-*"))
    imgs = sorted(raw.glob("flair_aerial_train/*/*/img/IMG_*.tif"))
    assert len(imgs) == 2
    assert "md5" in out and out.count(" ok ") >= len(TOPS)
    train, test = load_index(data / "index_train.csv"), load_index(data / "index_test.csv")
    assert len(train) == 2 and len(test) == 2
    assert sorted(Path(p).name for p in train["img_path"]) == [p.name for p in imgs]
    assert all(Path(p).is_file() for p in train["msk_path"])


def test_second_run_does_nothing_offline(server, zips, tmp_path, plenty_of_space, capsys):
    url, st = server
    st.files.update(zips)
    raw, data = tmp_path / "raw", tmp_path / "data"
    assert dl.main(_cli(url, raw, data, zips, "--keep-zips", "0")) == 0
    assert not list(raw.glob("*.zip"))  # --keep-zips 0 deleted them after extraction
    assert (data / "index_train.csv").is_file()
    index_mtime = (data / "index_train.csv").stat().st_mtime_ns
    st.requests.clear()
    capsys.readouterr()
    assert dl.main(_cli(url, raw, data, zips, "--keep-zips", "0")) == 0
    assert st.requests == []  # not a single HTTP request
    assert "nothing to do" in capsys.readouterr().out
    assert (data / "index_train.csv").stat().st_mtime_ns == index_mtime  # index not rebuilt either
    moved = raw.rename(tmp_path / "moved")  # markers are relative: a moved data folder stays complete
    assert dl.main(_cli(url, moved, data, zips, "--keep-zips", "0")) == 0
    assert st.requests == []


def test_resume_after_dropped_connection(server, zips, tmp_path):
    """A first run dies mid-file (retries=0, .part kept); the next asks only for the missing bytes."""
    url, st = server
    name = "flair_aerial_train.zip"
    st.files[name] = zips[name]
    size, cut = len(zips[name]), len(zips[name]) // 3 + 7
    st.drop_after[name] = cut
    raw = tmp_path / "raw"
    table = _table([name], zips)
    first = download("train", raw, mirror=Mirror(url, table=table), transfer=Transfer(retries=0, backoff=0,
                                                                                      progress=False))
    assert first[0].status == "failed" and "re-run to resume" in first[0].message
    assert (raw / (name + ".part")).stat().st_size == cut
    assert not (raw / name).exists()
    res = download("train", raw, mirror=Mirror(url, table=table), transfer=Transfer(retries=0, backoff=0,
                                                                                    progress=False))[0]
    assert st.requests == [(name, 0), (name, cut)]
    assert st.sent[name] == size  # every byte sent exactly once over the two runs
    assert (res.status, res.md5, res.extracted, res.resumed_from) == ("ok", "ok", "yes", cut)
    assert (raw / name).read_bytes() == zips[name]
    assert len(list(raw.glob("flair_aerial_train/*/*/img/IMG_*.tif"))) == 2


def test_retries_within_one_run(server, zips, tmp_path):
    """A 503 and a dropped connection in the same run are retried; still no byte fetched twice."""
    url, st = server
    name = "flair_sen_train.zip"
    st.files[name] = zips[name]
    st.fail_once.add(name)
    res = download("train", tmp_path, mirror=Mirror(url, table=_table([name], zips)),
                   transfer=Transfer(backoff=0, progress=False))
    assert res[0].status == "ok"
    st.requests.clear()
    st.sent.clear()
    other = "flair_labels_train.zip"
    st.files[other] = zips[other]
    st.drop_after[other] = 1000
    res = download("train", tmp_path, mirror=Mirror(url, table=_table([name, other], zips)),
                   transfer=Transfer(backoff=0, progress=False))
    assert [r.status for r in res] == ["skipped", "ok"]
    assert st.requests == [(other, 0), (other, 1000)]  # the finished zip is not asked again
    assert st.sent[other] == len(zips[other])


def test_md5_mismatch_deletes_the_file(server, zips, tmp_path, capsys):
    url, st = server
    name = "flair_labels_train.zip"
    st.files[name] = zips[name]
    table = _table([name], zips)
    res = download("train", tmp_path, mirror=Mirror(url, table=table, md5={name: "0" * 32}),
                   transfer=Transfer(backoff=0, progress=False))[0]
    assert res.status == "failed" and res.md5 == "mismatch"
    assert "md5 mismatch" in res.message and "deleted" in res.message and name in res.message
    assert "md5 mismatch" in capsys.readouterr().out
    assert not (tmp_path / name).exists() and not (tmp_path / (name + ".part")).exists()
    assert not marker_path(tmp_path, name).exists()
    assert not (tmp_path / "flair_labels_train").exists()


def _corrupt_crc(data: bytes) -> bytes:
    """Flip a byte inside the last member's stored data: the archive opens, its CRC check fails."""
    import io
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = [i for i in zf.infolist() if i.file_size > 0][-1]
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    pos = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]


@pytest.mark.parametrize("kind", ["truncated", "crc"])
def test_corrupt_zip_is_reported_and_deleted(server, zips, tmp_path, kind, capsys):
    url, st = server
    name = "flair_labels_train.zip"
    root = tmp_path / "src"
    make_dataset(root, SynthSpec(train_domains=1, test_domains=0, zones=1, patches=2, seed=5))
    good = _zip_tree(root, ["flair_labels_train"], tmp_path / "good.zip", stored=True)
    bad = good[: len(good) // 2] if kind == "truncated" else _corrupt_crc(good)
    st.files[name] = bad
    raw = tmp_path / "raw"
    table = {name: ZipSpec(name, len(bad), None, 3.0, ("train",))}
    res = download("train", raw, mirror=Mirror(url, table=table), transfer=Transfer(backoff=0,
                                                                                    progress=False))[0]
    assert res.status == "failed" and res.extracted == "failed"
    assert name in res.message and "corrupt" in res.message
    assert name in capsys.readouterr().out
    assert not marker_path(raw, name).exists()
    assert not (raw / name).exists()  # the rule: a corrupt zip is deleted, the next run fetches it again
    assert not (raw / "flair_labels_train").exists()  # nothing half-extracted in place
    assert not list(raw.glob(".tmp-extract-*"))


def test_not_enough_disk_space(server, zips, tmp_path, monkeypatch, capsys):
    url, st = server
    st.files.update(zips)
    name = "flair_aerial_train.zip"
    table = _table([name], zips)  # factor 3: needs 4x the zip size
    free = len(zips[name])
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: free)
    with pytest.raises(DiskSpaceError) as err:
        download("train", tmp_path / "raw", mirror=Mirror(url, table=table),
                 transfer=Transfer(backoff=0, progress=False))
    need = len(zips[name]) + int(len(zips[name]) * 3.0)
    assert f"{human(need - free)} missing" in str(err.value)
    assert st.requests == []  # refused before any byte is fetched
    # the CLI says the same and fails (the real table needs ~94 GB + extraction)
    assert dl.main(["--subset", "all", "--out", str(tmp_path / "raw"), "--base-url", url,
                    "--index-out", str(tmp_path / "data")]) == 1
    assert "missing" in capsys.readouterr().err
    assert st.requests == []


def test_extraction_needs_no_network_when_zip_is_there(server, zips, tmp_path):
    """Zip verified but extraction interrupted (no marker): the next run only extracts."""
    url, st = server
    name = "flair_2_labels_test.zip"
    (tmp_path / name).write_bytes(zips[name])
    (tmp_path / "flair_2_labels_test").mkdir()  # debris of an interrupted extraction
    res = download("train", tmp_path, mirror=Mirror(url, table=_table([name], zips)),
                   transfer=Transfer(progress=False))[0]
    assert st.requests == []
    assert res.status == "ok" and res.extracted == "yes"
    assert len(list(tmp_path.glob("flair_2_labels_test/*/*/msk/MSK_*.tif"))) == 2


def _domain_zip(root: Path, domain: str, dest: Path) -> None:
    """One zip per domain as on the HF mirror; inner layout assumed DOMAIN/ZONE/{img,msk,sen}/... [?]."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for f in sorted(root.glob(f"*/{domain}/*/*/*")):
            zf.write(f, f.relative_to(f.parents[3]).as_posix())


def test_extract_tree_hf_layout_then_index(tmp_path):
    """Hugging Face mirror layout (offline): domain zips in nested folders, JSONs in aux-data/."""
    root = make_dataset(tmp_path / "tree", SynthSpec(train_domains=1, test_domains=1, zones=1, patches=1,
                                                     seed=4))
    train_dom = next((root / "flair_aerial_train").iterdir()).name
    test_dom = next((root / "flair_2_aerial_test").iterdir()).name
    hf = tmp_path / "raw" / "hf"
    keys = [f"data/train-val/{train_dom}.zip", f"data/flair#2-test/{test_dom}.zip"]
    for key, domain in zip(keys, [train_dom, test_dom]):
        (hf / key).parent.mkdir(parents=True, exist_ok=True)
        _domain_zip(root, domain, hf / key)
    (hf / "aux-data").mkdir()
    for js in root.glob("*.json"):
        (hf / "aux-data" / js.name).write_bytes(js.read_bytes())
    raw = tmp_path / "raw"
    res = extract_tree(hf, raw, keep_zips=False, progress=False)
    assert sorted(r.name for r in res) == sorted(keys)
    assert all(r.status == "ok" and r.extracted == "yes" for r in res)
    assert not list(hf.rglob("*.zip"))  # keep_zips=False
    assert len(list(hf.glob(f"data/train-val/{train_dom}/*/img/IMG_*.tif"))) == 1
    assert len(list(hf.glob(f"data/flair#2-test/{test_dom}/*/sen/*_data.npy"))) == 1
    assert all(is_extracted(raw, key) for key in keys)
    assert extract_tree(hf, raw, progress=False) == []  # zips gone, markers stay: nothing to redo
    frames = build_index(raw)  # the index finds the files at their depth, split from the folder names
    assert (len(frames["train"]), len(frames["test"])) == (1, 1)
    assert set(frames["train"]["domain"]) == {train_dom} and set(frames["test"]["domain"]) == {test_dom}
    with pytest.raises(ValueError, match="not on the Hugging Face mirror"):
        download_hf("toy", raw)
