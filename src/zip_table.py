"""The official FLAIR #2 zips on the OVH bucket: names, approximate sizes, md5 sums, and which subset
(`make download SUBSET=...`) needs each one (docs/data-format.md, "Layout on disk").

Sizes are approximate (the challenge page's figures) and only feed the free-disk-space check.
"""
from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

BASE_URL = "https://storage.gra.cloud.ovh.net/v1/AUTH_366279ce616242ebb14161b7991a8461/defi-ia/flair_data_2/"
SUBSETS = ("toy", "aux", "train", "test", "all")
GB = 10**9
MB = 10**6


@dataclass(frozen=True)
class ZipSpec:
    """One downloadable zip: name on the server, approximate size, md5 (None = unknown), unpack factor.

    `factor` estimates extracted bytes / zip bytes for the disk check. The aerial and label TIFFs seem
    to be stored uncompressed (raw sizes: 61,712 x 1.31 MB = 81 GB vs a 50.7 GB zip; masks
    61,712 x 262 KB = 16 GB vs 485 MB), so labels inflate ~33x. S2 and JSON factors are guesses [?].
    The exact extracted size is read from the zip itself before extracting.
    """

    name: str
    size: int
    md5: str | None
    factor: float
    subsets: tuple[str, ...]


_TRAIN = ("train", "all")
_TEST = ("test", "all")
_AUX = ("aux", "train", "test", "all")

# The one table of the official zips (docs/data-format.md, "Layout on disk"; md5 sums from torchgeo
# PR #2394, none from IGN).
ZIPS: dict[str, ZipSpec] = {z.name: z for z in [
    ZipSpec("flair_aerial_train.zip", int(50.7 * GB), "0f575b360800f58add19c08f05e18429", 1.6, _TRAIN),
    ZipSpec("flair_sen_train.zip", int(22.8 * GB), "56fbbd465726ea4dfeea02734edd7cc5", 1.5, _TRAIN),
    ZipSpec("flair_labels_train.zip", 485 * MB, "80d3cd2ee117a61128faa08cbb842c0c", 34.0, _TRAIN),
    ZipSpec("flair_2_aerial_test.zip", int(13.4 * GB), "a647e0ba7e5345b28c48d7887ee79888", 1.6, _TEST),
    ZipSpec("flair_2_sen_test.zip", 6 * GB, "aae8649dbe457620a76269d915d07624", 1.5, _TEST),
    ZipSpec("flair_2_labels_test.zip", 108 * MB, "394a769ffcb4a783335eecd3f8baef57", 40.0, _TEST),
    ZipSpec("flair_2_aerial_metadata.zip", 16 * MB, None, 8.0, _AUX),
    ZipSpec("flair_2_centroids_sp_to_patch.zip", 16 * MB, "f8ba3b176197c254b6c165c97e93c759", 8.0, _AUX),
    ZipSpec("flair_2_toy_dataset.zip", int(1.6 * GB), "ffde17f275fc258dce19331b5e17e10a", 2.5, ("toy",)),
]}


def select(subset: str, table: Mapping[str, ZipSpec] | None = None) -> list[ZipSpec]:
    """The zips of a subset, in table order."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r} (choose from {', '.join(SUBSETS)})")
    return [z for z in (table or ZIPS).values() if subset in z.subsets]


def zip_url(base_url: str, name: str) -> str:
    """URL of a zip on the bucket (or on a mirror with the same file names)."""
    return base_url.rstrip("/") + "/" + urllib.parse.quote(name)
