"""The Hugging Face mirror `IGNF/FLAIR` of FLAIR #2 (`make download SOURCE=hf`): its file patterns and
the download of a subset through huggingface_hub, which resumes interrupted files itself.

Layout [P]: one zip per domain under data/train-val/ and data/flair#2-test/, the JSONs under aux-data/.
The inner depth of the domain zips is not documented [?]: everything is extracted next to its zip under
RAW/hf/ and the index finds files by recursive walk.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from src.disk_space import human, require_space
from src.download_log import Result
from src.errors import DownloadError
from src.extract import extract_tree, is_extracted, write_marker
from src.zip_table import select

HF_REPO = "IGNF/FLAIR"
HF_AUX = ["aux-data/*.json"]
HF_PATTERNS: dict[str, list[str]] = {
    "aux": HF_AUX,
    "train": ["data/train-val/*.zip", *HF_AUX],
    "test": ["data/flair#2-test/*.zip", *HF_AUX],
    "all": ["data/train-val/*.zip", "data/flair#2-test/*.zip", *HF_AUX],
}
HF_FACTOR = 1.6  # extracted / zipped for a domain zip (mostly aerial TIFFs) [?]


def _wanted(repo_id: str, patterns: list[str]) -> list[tuple[str, int]]:
    """(repo path, size) of the mirror's files matching `patterns`; DownloadError when none can be listed."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(repo_id, files_metadata=True)
    except Exception as err:  # offline mode, network, auth: one clear line instead of a traceback
        raise DownloadError(f"Hugging Face {repo_id}: cannot list files "
                            f"({type(err).__name__}: {err})") from None
    wanted = [(s.rfilename, s.size or 0) for s in info.siblings or []
              if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
    if not wanted:
        raise DownloadError(f"no file of {repo_id} matches {patterns}: the mirror's layout changed?")
    return wanted


def download_hf(subset: str = "all", out: str | os.PathLike = "data/raw", *, repo_id: str = HF_REPO,
                keep_zips: bool = True, check_space: bool = True, progress: bool = True) -> list[Result]:
    """Fetch the subset from the Hugging Face mirror into `out`/hf, then extract its zips in place.

    A subset marker makes a re-run offline; zips already extracted (and possibly deleted with
    keep_zips off) are not requested again.
    """
    out = Path(out)
    if subset == "toy":
        raise ValueError("the toy zip is not on the Hugging Face mirror: use --source ovh")
    select(subset)  # validates the name
    hf_dir = out / "hf"
    if is_extracted(out, f"hf-{subset}"):
        print(f"{subset}: already downloaded from {repo_id} into {hf_dir}; nothing to do")
        return []
    from huggingface_hub import snapshot_download

    wanted = _wanted(repo_id, HF_PATTERNS[subset])
    todo = [(f, n) for f, n in wanted if not (is_extracted(out, f) or (hf_dir / f).is_file())]
    if todo:
        if check_space:
            dl = sum(n for _, n in todo)
            ex = int(sum(n for f, n in todo if f.endswith(".zip")) * HF_FACTOR)
            require_space(out, dl + ex, f"subset {subset!r} from {repo_id} ({human(dl)} to download "
                                        f"+ {human(ex)} to extract)")
        print(f"{subset}: {len(todo)} files from {repo_id} into {hf_dir}")
        try:
            snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f for f, _ in todo],
                              local_dir=hf_dir)
        except Exception as err:
            raise DownloadError(f"Hugging Face {repo_id}: download failed ({type(err).__name__}: {err}); "
                                "re-run to resume") from None
    results = extract_tree(hf_dir, out, keep_zips=keep_zips, progress=progress, check_space=check_space)
    if all(r.status != "failed" for r in results):
        write_marker(out, f"hf-{subset}", {"zip": f"hf-{subset}", "dest": "hf", "entries": []}, indent=None)
    return results
