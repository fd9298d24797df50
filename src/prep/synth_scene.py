"""The ground truth of a synthetic FLAIR #2 dataset: domains, zones, their label fields and S2 dates.

Each zone has one continuous label field (12 smooth class-score maps on the 10 m S2 pixel grid + rare-class
disks); the 0.2 m aerial labels and the 10 m S2 super-area are both rendered from it (src.prep.synth_write),
so the S2 pixels under a patch (at its centroid) agree with the patch's labels. Domains draw their own class
frequencies and radiometry; classes have their own S2 phenology; S2 dates vary per zone (T 8..50 in the domain
year) and super-areas vary in size and are not square. `plan_dataset` draws all of it without
writing a file, so tests can compare the written tree with its truth.

Two phenologies (`PHENOLOGIES`, SynthSpec.phenology): "smooth" (the default, the kit's figures up to issue
28: every class a slow trapezoid over the year) and "events" (issue 28: S2-only pairs that differ by short,
dated events, a rare S2-only class, mowing, per-domain calendar shifts and cloudy months hiding events on some
zones; see `add_events`). "events" draws from its own generators, so a zone's geometry and labels are the
same under both for the same seed, except for plowed land, which "events" makes rare."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import cv2
import numpy as np

from src.core.flair import NOMENCLATURE_19, PATCH_SIZE, S2_WINDOW, s2_pixels_under

PATCH_S2 = s2_pixels_under(PATCH_SIZE)  # 10.24 S2 pixels under one patch
SLOT = 11  # patches sit on an 11 S2-pixel grid (10.24 px + a gap), so they never overlap
S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
NUM_MAIN = 12  # raw classes 1..12 come from the score fields; 13..19 are rare disks
PHENOLOGIES = ("smooth", "events")  # SynthSpec.phenology: today's smooth curves, or short dated events

_RAW = {name: value for value, name, _ in NOMENCLATURE_19}
BARE, HERB, AGRI, PLOWED = (_RAW[n] for n in ("bare soil", "herbaceous vegetation", "agricultural land",
                                             "plowed land"))
# Under "events", the S2-only pairs (base class, event class): same aerial look, same S2 base curve and
# strength; the second differs from the first only by its events (a harvest peak, a late green-up).
EVENT_PAIRS = ((HERB, AGRI), (BARE, PLOWED))

# Real FLAIR #2 test domains (docs/data-format.md, "Layout on disk"); train codes are real-looking and
# disjoint from them.
TEST_DOMAINS = ["D015_2020", "D022_2021", "D026_2020", "D036_2020", "D061_2020",
                "D064_2021", "D068_2021", "D069_2020", "D071_2020", "D084_2021"]
TRAIN_DOMAINS = ["D004_2021", "D006_2020", "D007_2020", "D008_2019", "D009_2019", "D013_2020",
                 "D014_2020", "D016_2020", "D017_2018", "D021_2020", "D023_2020", "D029_2021",
                 "D030_2021", "D031_2019", "D032_2019", "D033_2021", "D034_2021", "D035_2020",
                 "D038_2021", "D041_2021", "D044_2020", "D046_2019", "D049_2020", "D051_2019",
                 "D052_2019", "D055_2018", "D058_2020", "D060_2021", "D063_2019", "D066_2021",
                 "D067_2021", "D070_2020", "D072_2019", "D074_2020", "D077_2021", "D078_2021",
                 "D080_2021", "D081_2020", "D083_2020", "D085_2019"]
CAMERAS = ["UCE-M3-f120-s06", "UCE-M3-f100-s06", "UCE-M3-f080-s06", "UCE-M1-f100-s06"]

# Base class frequencies for raw 1..12 (roughly FLAIR-like); each domain draws its own around them.
BASE_FREQ = np.array([0.08, 0.08, 0.10, 0.03, 0.04, 0.04, 0.15, 0.06, 0.03, 0.15, 0.15, 0.06])

# S2 reflectance spectra (B2 B3 B4 B5 B6 B7 B8 B8A B11 B12), 0..1.
_SPEC = {
    "veg": [0.03, 0.06, 0.03, 0.10, 0.30, 0.38, 0.42, 0.44, 0.22, 0.11],
    "conifer": [0.02, 0.04, 0.02, 0.07, 0.20, 0.25, 0.28, 0.30, 0.14, 0.07],
    "soil": [0.08, 0.11, 0.14, 0.17, 0.19, 0.21, 0.23, 0.25, 0.32, 0.27],
    "urban": [0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.20, 0.18],
    "water": [0.06, 0.05, 0.03, 0.02, 0.015, 0.012, 0.01, 0.01, 0.005, 0.003],
    "pool": [0.14, 0.12, 0.06, 0.04, 0.03, 0.02, 0.02, 0.02, 0.01, 0.01],
    "snow": [0.86, 0.85, 0.83, 0.80, 0.78, 0.76, 0.74, 0.72, 0.10, 0.08],
    "cloud": [0.76, 0.75, 0.75, 0.75, 0.76, 0.76, 0.77, 0.77, 0.56, 0.45],
    "greenhouse": [0.30, 0.31, 0.31, 0.32, 0.33, 0.34, 0.35, 0.35, 0.30, 0.25],
}
SPECTRA = {k: np.array(v, np.float32) for k, v in _SPEC.items()}

# S2 phenology per raw class: (background spectrum, vegetation spectrum, green fraction curve).
# Curve: (low, high, green-up start, green-up end, senescence start, senescence end) in day of year;
# low == high means a flat curve.
_PHENO = {
    1: ("urban", "veg", (0.02, 0.02, 0, 0, 0, 0)),
    2: ("urban", "veg", (0.30, 0.45, 80, 130, 230, 290)),
    3: ("urban", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    4: ("soil", "veg", (0.03, 0.08, 100, 150, 200, 250)),
    5: ("water", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    6: ("soil", "conifer", (0.80, 0.85, 90, 150, 250, 300)),
    7: ("soil", "veg", (0.15, 0.90, 95, 140, 275, 320)),
    8: ("soil", "veg", (0.30, 0.65, 95, 140, 260, 310)),
    9: ("soil", "veg", (0.08, 0.55, 130, 180, 250, 290)),
    10: ("soil", "veg", (0.60, 0.85, 60, 110, 180, 230)),   # herbaceous: green all year
    11: ("soil", "veg", (0.02, 0.95, 80, 130, 170, 195)),   # agricultural: bare winter, harvest in July
    12: ("soil", "veg", (0.05, 0.12, 120, 150, 180, 220)),
    13: ("pool", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    14: ("snow", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    15: ("soil", "veg", (0.20, 0.40, 100, 150, 230, 280)),
    16: ("soil", "conifer", (0.50, 0.85, 95, 140, 275, 320)),
    17: ("soil", "veg", (0.40, 0.70, 95, 140, 260, 310)),
    18: ("greenhouse", "veg", (0.0, 0.0, 0, 0, 0, 0)),
    19: ("urban", "veg", (0.10, 0.15, 100, 150, 230, 280)),
}


@dataclass
class ZoneTruth:
    """Everything that defines one synthetic zone; tests compare the written files against it."""

    split: str
    domain: str
    zone: str
    year: int
    fields: np.ndarray  # (12, H, W) float32 class scores at S2 pixel centres (raw classes 1..12)
    blobs: np.ndarray  # (n, 4) float32: raw class 13..19, centre row, centre col, radius (S2 pixels)
    s2_labels: np.ndarray  # (H, W) uint8 raw class at each S2 pixel centre
    fractions: np.ndarray  # (20, H, W) float32 area fraction of each raw class in each S2 pixel
    days: np.ndarray  # (T,) int day of year of each S2 date
    profiles: np.ndarray  # (20, T, 10) float32 clear-sky reflectance (0..1) of each raw class
    patches: list[tuple[str, int, int]] = field(default_factory=list)  # (id, top row, left col) in S2 px
    style: dict = field(default_factory=dict)  # domain radiometry and zone geography

    @property
    def shape(self) -> tuple[int, int]:
        return self.s2_labels.shape

    @staticmethod
    def centroid(r0: int, c0: int) -> tuple[int, int]:
        """[row, col] written in the centroids JSON for a patch whose top-left S2 pixel is (r0, c0)."""
        return r0 + int(PATCH_S2 / 2), c0 + int(PATCH_S2 / 2)


# ----------------------------------------------------------------------------------------------- noise
def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field whose features are about `scale` pixels wide."""
    h, w = shape
    gh, gw = int(np.ceil(h / scale)) + 3, int(np.ceil(w / scale)) + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = cv2.resize(grid, (int(gw * scale), int(gh * scale)), interpolation=cv2.INTER_CUBIC)
    oy = int(rng.integers(0, max(1, up.shape[0] - h - int(scale))) + scale // 2)
    ox = int(rng.integers(0, max(1, up.shape[1] - w - int(scale))) + scale // 2)
    out = up[oy:oy + h, ox:ox + w]
    out = out - out.mean()
    return out / (out.std() + 1e-6)


def _sample(fields: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples of (K, H, W) fields at float pixel coordinates (H axis rows, W axis cols)."""
    mx, my = cols.astype(np.float32), rows.astype(np.float32)
    return np.stack([cv2.remap(f, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) for f in fields])


def labels_at(zt: ZoneTruth, rows: np.ndarray, cols: np.ndarray,
               jitter: np.ndarray | None = None) -> np.ndarray:
    """Raw labels (uint8 1..19) of the zone at S2 coordinates where pixel (a, b) has centre (a, b)."""
    scores = _sample(zt.fields, rows, cols)
    if jitter is not None:
        scores += jitter
    labels = (scores.argmax(0) + 1).astype(np.uint8)
    if len(zt.blobs):
        r_lo, r_hi, c_lo, c_hi = rows.min(), rows.max(), cols.min(), cols.max()
        for k, br, bc, rad in zt.blobs:
            if br + rad < r_lo or br - rad > r_hi or bc + rad < c_lo or bc - rad > c_hi:
                continue
            labels[(rows - br) ** 2 + (cols - bc) ** 2 <= rad * rad] = int(k)
    return labels


def _curve(doy: np.ndarray, low: float, high: float, g0: float, g1: float, s0: float,
           s1: float) -> np.ndarray:
    """Trapezoid green fraction over the year: low, linear green-up g0->g1, high, senescence s0->s1."""
    if low == high:
        return np.full(doy.shape, low, np.float32)
    up = np.clip((doy - g0) / max(g1 - g0, 1), 0, 1)
    down = np.clip((s1 - doy) / max(s1 - s0, 1), 0, 1)
    return (low + (high - low) * np.minimum(up, down)).astype(np.float32)


def class_profiles(days: np.ndarray, shift: float = 0.0,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """(20, T, 10) clear-sky reflectance of each raw class on the given days of year (row 0 unused)."""
    out = np.zeros((20, len(days), len(S2_BANDS)), np.float32)
    doy = days.astype(np.float32) - shift
    for k, (bg, veg, curve) in _PHENO.items():
        green = _curve(doy, *curve)
        if rng is not None:  # a little zone-to-zone variability in the strength of each class
            green = np.clip(green * rng.uniform(0.9, 1.1), 0, 1)
        out[k] = (1 - green)[:, None] * SPECTRA[bg][None] + green[:, None] * SPECTRA[veg][None]
    return out


# ---------------------------------------------------------------------------------------------- events
# Event shapes under "events": (day offsets from the event's date, level) knots, interpolated linearly and
# 0 outside; level +1 pulls the green fraction to the event's high value, -1 to its low value. Each is short
# (2-6 weeks), as real crop events are, so a model that only reads slow trends misses them.
HARVEST = ((-14, 0, 10, 20, 30), (0, 1, -1, -1, 0))  # ~4-week green peak, harvest, stubble, regrowth
GREEN_UP = ((-12.5, 0, 12.5), (0, 1, 0))  # a late, narrow green-up of 25 days (sown or weedy plowed land)
MOWING = ((0, 3, 17), (0, -1, 0))  # a cut, then two weeks of regrowth (drops that are not harvests)
PLOWED_KEEP = 0.5  # share of plowed land's domain prior it keeps: rare (< 5 % of the pixels), as in real data
CALENDAR_SHIFT = 21.0  # days: per-domain shift of every event (latitude, altitude, the year's weather)
HIDDEN_RATE = 0.5  # chance that a cloudy month hides one of a zone's events


def events_style(style: dict, rng: np.random.Generator) -> dict:
    """A domain's style under "events": a calendar shift of up to three weeks (the same crop is cut earlier
    in one domain than another, so the date of an event alone must not name the class), and plowed land made
    rare, its prior mass given to bare soil so that the pair stays balanced against everything else."""
    freq = np.exp(style["log_freq"].astype(np.float64))
    moved = freq[PLOWED - 1] * (1 - PLOWED_KEEP)
    freq[PLOWED - 1] -= moved
    freq[BARE - 1] += moved
    return dict(style, log_freq=np.log(freq).astype(np.float32), phenology="events",
                calendar_shift=float(rng.uniform(-CALENDAR_SHIFT, CALENDAR_SHIFT)))


def zone_calendar(rng: np.random.Generator, shift: float) -> dict:
    """A zone's event dates (day of year, the domain's shift included): the harvest peak at a time of year
    that varies per zone (crops differ), the late green-up, one or two mowings, and, on some zones, a
    cloudy month (`hidden`: first and last day) centred on the harvest peak or the green-up, which hides
    that event as clouds do in real series."""
    shift += float(rng.uniform(-5, 5))
    cal = {"harvest": float(rng.uniform(130, 200)) + shift, "green_up": float(rng.uniform(270, 300)) + shift,
           "mowing": sorted((rng.uniform(120, 250, int(rng.integers(1, 3))) + shift).tolist()),
           "hidden": None}
    if rng.random() < HIDDEN_RATE:
        centre = cal["harvest"] if rng.random() < 0.5 else cal["green_up"]
        cal["hidden"] = (centre - 15.0, centre + 15.0)
    return cal


def event_windows(cal: dict) -> dict[int, list[tuple[float, float]]]:
    """Per event class, the (first, last) days where it may differ in S2 from its base class: the harvest
    and the mowings for agricultural land (herbaceous vegetation is mown, crops are not), the green-up for
    plowed land. Outside these windows a pair's S2 profiles are identical."""
    def span(day: float, knots: tuple) -> tuple[float, float]:
        return day + knots[0][0], day + knots[0][-1]
    return {AGRI: [span(cal["harvest"], HARVEST)] + [span(m, MOWING) for m in cal["mowing"]],
            PLOWED: [span(cal["green_up"], GREEN_UP)]}


def _event(doy: np.ndarray, day: float, knots: tuple) -> np.ndarray:
    """Level (-1..1) of an event of shape `knots` dated `day`, on each day of year in `doy`."""
    level = np.interp(doy, day + np.asarray(knots[0], np.float32), knots[1], left=0, right=0)
    return level.astype(np.float32)


def _toward(green: np.ndarray, level: np.ndarray, high: float, low: float) -> np.ndarray:
    """Green fraction pulled toward `high` where the event level is positive, toward `low` where negative."""
    return green + np.maximum(level, 0) * (high - green) + np.maximum(-level, 0) * (low - green)


def add_events(zt: ZoneTruth, rng: np.random.Generator) -> None:
    """Turn a zone's smooth truth into the "events" one: draw its calendar (`zone_calendar`, kept in
    zt.style["events"]) and rewrite the S2 profiles of both S2-only pairs. Each pair shares one base curve
    and one strength, so its members differ only inside `event_windows`."""
    cal = zone_calendar(rng, zt.style["calendar_shift"])
    doy = zt.days.astype(np.float32)
    base = {k: _curve(doy - zt.style["calendar_shift"], *_PHENO[k][2]) for k in (HERB, BARE)}
    herb = base[HERB]
    for day in cal["mowing"]:
        herb = _toward(herb, _event(doy, day, MOWING), 0.0, 0.25)
    greens = {HERB: herb, AGRI: _toward(base[HERB], _event(doy, cal["harvest"], HARVEST), 0.97, 0.05),
              BARE: base[BARE], PLOWED: _toward(base[BARE], _event(doy, cal["green_up"], GREEN_UP), 0.7, 0.0)}
    for (k0, k1), gain in zip(EVENT_PAIRS, rng.uniform(0.9, 1.1, len(EVENT_PAIRS))):
        bg, veg = SPECTRA[_PHENO[k0][0]], SPECTRA[_PHENO[k0][1]]
        for k in (k0, k1):
            green = np.clip(greens[k] * gain, 0, 1)[:, None]
            zt.profiles[k] = (1 - green) * bg[None] + green * veg[None]
    zt.style["events"] = cal


def hidden_dates(zt: ZoneTruth) -> set[int]:
    """Indices of the zone's dates inside its cloudy month (fully clouded when written; empty under
    "smooth" and on zones without one)."""
    hidden = zt.style.get("events", {}).get("hidden")
    if hidden is None:
        return set()
    return {i for i, d in enumerate(zt.days) if hidden[0] <= d <= hidden[1]}


# ------------------------------------------------------------------------------------------------ plan
def _domain_names(n_train: int, n_test: int) -> list[tuple[str, str]]:
    """(split, domain) pairs: real-looking train codes, real test codes (then made-up ones if more asked)."""
    train = list(TRAIN_DOMAINS[:n_train])
    test = list(TEST_DOMAINS[:n_test])
    used = {d[:4] for d in TRAIN_DOMAINS + TEST_DOMAINS}
    extra = (f"D{n:03d}" for n in range(100, 1000) if f"D{n:03d}" not in used)
    while len(train) < n_train:
        train.append(f"{next(extra)}_{2018 + len(train) % 4}")
    while len(test) < n_test:
        test.append(f"{next(extra)}_{2020 + len(test) % 2}")
    return [("train", d) for d in train] + [("test", d) for d in test]


def _zone_names(rng: np.random.Generator, n: int) -> list[str]:
    """Z<n>_<2 letters> names, unique inside a domain (letters as in the real data: N, U, A)."""
    nums = sorted(rng.choice(np.arange(1, 30), size=n, replace=False).tolist())
    return [f"Z{k}_{''.join(rng.choice(list('NUA'), 2))}" for k in nums]


def _domain_style(rng: np.random.Generator, year: int) -> dict:
    """Per-domain radiometry (gain/offset per band), class frequencies, flight date and camera."""
    freq = rng.dirichlet(BASE_FREQ * 40)
    flight = dt.date(year, 1, 1) + dt.timedelta(days=int(rng.integers(95, 260)))
    return {
        "gain": rng.uniform(0.85, 1.15, 4).astype(np.float32),
        "offset": rng.uniform(-12, 12, 4).astype(np.float32),
        "elev_gain": float(rng.uniform(0.9, 1.1)),
        "log_freq": np.log(freq).astype(np.float32),
        "rare_rate": float(rng.uniform(0.5, 2.0)),
        "flight": flight,
        "camera": str(rng.choice(CAMERAS)),
        "x0": float(rng.uniform(150_000, 1_150_000)),
        "y0": float(rng.uniform(6_150_000, 7_050_000)),
        "z0": float(rng.uniform(5, 900)),
    }


def _zone_truth(split: str, domain: str, zone: str, style: dict, patches: int,
                rng: np.random.Generator, ids: list[str], edge_rate: float) -> ZoneTruth:
    """Draw the zone: super-area size, label fields, rare blobs, S2 dates, profiles and patch positions."""
    year = int(domain.split("_")[1])
    h, w = (int(v) for v in rng.integers(60, 91, 2))
    if h == w:
        w += 3
    # Grow the super-area until enough non-overlapping slots keep a full 40x40 window inside.
    half = S2_WINDOW // 2
    def slots(n: int) -> list[int]:
        return list(range(half - int(PATCH_S2 / 2), n - half - int(PATCH_S2 / 2) + 1, SLOT))
    while len(slots(h)) * len(slots(w)) < patches:
        if len(slots(h)) <= len(slots(w)):
            h += SLOT
        else:
            w += SLOT
    grid = [(r, c) for r in slots(h) for c in slots(w)]
    chosen = sorted(rng.choice(len(grid), size=patches, replace=False).tolist())
    positions = [grid[i] for i in chosen]
    # Occasionally put a patch against the border so that window padding gets exercised downstream.
    for i in range(len(positions)):
        if rng.random() < edge_rate:
            positions[i] = (int(rng.integers(0, 4)), positions[i][1])

    # Class score fields on the S2 pixel grid: two scales of smooth noise + the domain's class frequencies.
    fields = np.stack([1.0 * smooth_noise(rng, (h, w), 3.0) + 0.8 * smooth_noise(rng, (h, w), 9.0)
                       for _ in range(NUM_MAIN)]) + style["log_freq"][:, None, None]
    fields = fields.astype(np.float32)
    n_blobs = int(rng.poisson(style["rare_rate"] * h * w / 400))
    blobs = np.zeros((n_blobs, 4), np.float32)
    if n_blobs:
        blobs[:, 0] = rng.integers(13, 20, n_blobs)
        blobs[:, 1] = rng.uniform(0, h - 1, n_blobs)
        blobs[:, 2] = rng.uniform(0, w - 1, n_blobs)
        blobs[:, 3] = rng.uniform(0.4, 1.6, n_blobs)

    t = int(rng.integers(8, 51))
    n_days = 366 if year % 4 == 0 else 365
    days = np.sort(rng.choice(np.arange(1, n_days + 1), size=t, replace=False))
    profiles = class_profiles(days, shift=float(rng.uniform(-12, 12)), rng=rng)

    zt = ZoneTruth(split, domain, zone, year, fields, blobs, np.zeros((h, w), np.uint8),
                   np.zeros((20, h, w), np.float32), days, profiles,
                   [(i, r, c) for i, (r, c) in zip(ids, positions)], style)
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    zt.s2_labels = labels_at(zt, rr, cc)
    # Area fractions from a 5x5 supersampling of every S2 pixel (mixed pixels at class boundaries).
    s = 5
    sub = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    rs = (np.arange(h, dtype=np.float32)[:, None] + sub[None]).reshape(-1)
    cs = (np.arange(w, dtype=np.float32)[:, None] + sub[None]).reshape(-1)
    fine = labels_at(zt, *np.meshgrid(rs, cs, indexing="ij")).reshape(h, s, w, s)
    zt.fractions = np.stack([(fine == k).mean((1, 3)) for k in range(20)]).astype(np.float32)
    zt.style = dict(style, zone_x=style["x0"] + rng.uniform(-20_000, 20_000),
                    zone_y=style["y0"] + rng.uniform(-20_000, 20_000),
                    zone_z=style["z0"] + rng.uniform(-50, 50), tile=_tile(rng),
                    orbit=int(rng.integers(1, 144)))
    return zt


def _tile(rng: np.random.Generator) -> str:
    letters = "CDEFGHJKLMNPQRSTUVWXYZ"
    a, b = rng.choice(list(letters), 2)
    return f"T{rng.integers(30, 33)}{rng.choice(list('TU'))}{a}{b}"


def plan_dataset(train_domains: int = 3, test_domains: int = 2, zones: int = 2, patches: int = 4,
                 seed: int = 0, edge_rate: float = 0.05, phenology: str = "smooth") -> list[ZoneTruth]:
    """The ground truth of the dataset `make_dataset` writes with the same arguments (no files written).
    "events" draws from generators of its own ([seed, domain, 0, 1], [seed, domain, zone + 1, 1]), so the
    "smooth" draws, and their bytes, are untouched by its existence."""
    if phenology not in PHENOLOGIES:
        raise ValueError(f"phenology must be one of {', '.join(PHENOLOGIES)}, got {phenology!r}")
    pairs = _domain_names(train_domains, test_domains)
    n_total = len(pairs) * zones * patches
    id_rng = np.random.default_rng([seed, 7, 7])
    ids = [f"{i:06d}" for i in np.sort(id_rng.choice(1_000_000, size=n_total, replace=False))]
    out: list[ZoneTruth] = []
    k = 0
    for di, (split, domain) in enumerate(pairs):
        drng = np.random.default_rng([seed, di, 0])
        style = _domain_style(drng, int(domain.split("_")[1]))
        if phenology == "events":
            style = events_style(style, np.random.default_rng([seed, di, 0, 1]))
        for zi, zone in enumerate(_zone_names(drng, zones)):
            zrng = np.random.default_rng([seed, di, zi + 1])
            out.append(_zone_truth(split, domain, zone, style, patches, zrng, ids[k:k + patches], edge_rate))
            if phenology == "events":
                add_events(out[-1], np.random.default_rng([seed, di, zi + 1, 1]))
            k += patches
    return out
