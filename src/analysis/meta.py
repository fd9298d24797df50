"""Metadata of the EDA notebook: acquisition dates and times, cameras, altitude, and where the domains lie
on a rough map of France (docs/data-format.md, "Metadata")."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from src.analysis.common import DPI, MONTHS, pyplot
from src.core.files import save_figure

_HOUR_RE = re.compile(r"^\s*(\d{1,2})\s*h\s*(\d{1,2})")

# Rough outline of mainland France and Corsica in Lambert-93 kilometres (EPSG:2154), projected by hand
# from ~60 coastline/border points: enough to place patch centroids, not a boundary.
FRANCE_L93_KM: tuple[tuple[tuple[float, float], ...], ...] = (
    ((668, 7111), (714, 7074), (786, 6995), (832, 7007), (903, 6943), (944, 6934), (992, 6902), (1082, 6887),
     (1045, 6732), (991, 6701), (937, 6616), (929, 6565), (995, 6540), (1002, 6457), (1019, 6358),
     (1064, 6308), (1023, 6281), (993, 6235), (936, 6221), (887, 6253), (830, 6251), (757, 6256), (704, 6211),
     (714, 6148), (659, 6139), (593, 6156), (512, 6197), (430, 6195), (313, 6264), (363, 6398), (381, 6508),
     (376, 6575), (332, 6611), (307, 6696), (241, 6729), (151, 6770), (127, 6834), (152, 6865), (224, 6881),
     (332, 6851), (365, 6849), (343, 6967), (393, 6964), (402, 6924), (490, 6932), (505, 6965), (564, 6985),
     (600, 7018), (601, 7073), (623, 7099)),
    ((1222, 6232), (1239, 6167), (1234, 6077), (1215, 6051), (1185, 6068), (1160, 6116), (1161, 6161),
     (1200, 6199)),
)


def metadata_table(df: pd.DataFrame) -> pd.DataFrame:
    """Metadata columns of the index with parsed types: date (datetime, NaT when missing), hour (float)."""
    cols = ["id", "split", "domain", "zone", "camera", "date", "time",
            "patch_centroid_x", "patch_centroid_y", "patch_centroid_z"]
    out = df[cols].copy()
    out["date"] = pd.to_datetime(out["date"].replace("", None), format="%Y-%m-%d", errors="coerce")

    def hour(text: str) -> float:
        m = _HOUR_RE.match(str(text))
        return int(m.group(1)) + int(m.group(2)) / 60 if m else np.nan

    out["hour"] = out["time"].map(hour).astype(float)
    return out


def plot_metadata(meta: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Acquisition month, hour of day, camera and altitude of the aerial patches, train vs test."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    (ax_m, ax_h), (ax_c, ax_z) = axes
    splits = [s for s in ("train", "test") if (meta["split"] == s).any()]
    colours = {"train": "tab:blue", "test": "tab:orange"}
    width = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        sel = meta[meta["split"] == split]
        counts = sel["date"].dt.month.value_counts().reindex(range(1, 13), fill_value=0)
        ax_m.bar(np.arange(1, 13) + (i - (len(splits) - 1) / 2) * width, 100 * counts / max(len(sel), 1),
                 width, color=colours[split], label=split)
        hours = sel["hour"].dropna()
        if len(hours):
            ax_h.hist(hours, bins=np.arange(5, 21, 0.5), weights=np.full(len(hours), 100 / len(hours)),
                      histtype="step", linewidth=1.5, color=colours[split], label=split)
        z = sel["patch_centroid_z"].dropna()
        if len(z):
            bins = np.histogram_bin_edges(meta["patch_centroid_z"].dropna(), bins=30)
            ax_z.hist(z, bins=bins, weights=np.full(len(z), 100 / len(z)), histtype="step", linewidth=1.5,
                      color=colours[split], label=split)
    ax_m.set_xticks(range(1, 13), MONTHS)
    ax_m.set_ylabel("% of patches")
    ax_m.set_title("aerial acquisition month", fontsize=10)
    ax_h.set_xlabel("hour of day")
    ax_h.set_ylabel("% of patches")
    ax_h.set_title("acquisition time", fontsize=10)
    ax_z.set_xlabel("altitude of the patch centroid (m)")
    ax_z.set_ylabel("% of patches")
    ax_z.set_title("altitude", fontsize=10)
    cams = meta.assign(camera=meta["camera"].replace("", "(unknown)")).groupby(["camera", "split"]).size()
    cams = cams.unstack(fill_value=0).reindex(columns=splits, fill_value=0)
    cams = cams.loc[cams.sum(axis=1).sort_values().index]
    left = np.zeros(len(cams))
    for split in splits:
        ax_c.barh(range(len(cams)), cams[split], left=left, color=colours[split], label=split)
        left += cams[split].to_numpy()
    ax_c.set_yticks(range(len(cams)), cams.index, fontsize=8)
    ax_c.set_xlabel("patches")
    ax_c.set_title("camera", fontsize=10)
    for ax in axes.ravel():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")


def france_paths():
    """matplotlib Paths of the rough France outline (Lambert-93 km)."""
    from matplotlib.path import Path as MplPath

    return [MplPath(np.array(poly, dtype=float)) for poly in FRANCE_L93_KM]


def inside_france(x_m: np.ndarray, y_m: np.ndarray) -> np.ndarray:
    """True for the Lambert-93 points (metres) inside the rough outline."""
    pts = np.column_stack([np.asarray(x_m, float), np.asarray(y_m, float)]) / 1000.0
    out = np.zeros(len(pts), dtype=bool)
    for p in france_paths():
        out |= p.contains_points(pts)
    return out


def domain_positions(meta: pd.DataFrame) -> pd.DataFrame:
    """Median centroid (Lambert-93 m) and patch count of each (split, domain) with coordinates."""
    sel = meta.dropna(subset=["patch_centroid_x", "patch_centroid_y"])
    return sel.groupby(["split", "domain"]).agg(x=("patch_centroid_x", "median"),
                                                y=("patch_centroid_y", "median"),
                                                patches=("id", "size")).reset_index()


def nearest_train_domain(meta: pd.DataFrame) -> pd.DataFrame:
    """For each test domain: the nearest train domain (median centroids) and the distance in km."""
    pos = domain_positions(meta)
    train, test = pos[pos["split"] == "train"], pos[pos["split"] == "test"]
    rows = []
    for _, t in test.iterrows():
        if train.empty:
            break
        d = np.hypot(train["x"] - t["x"], train["y"] - t["y"]).to_numpy() / 1000.0
        i = int(np.argmin(d))
        rows.append({"test_domain": t["domain"], "nearest_train": train.iloc[i]["domain"],
                     "km": round(float(d[i]), 1)})
    return pd.DataFrame(rows, columns=["test_domain", "nearest_train", "km"])


def plot_map(meta: pd.DataFrame, path: str | os.PathLike, max_points: int = 30000, seed: int = 0) -> Path:
    """Patch centroids (Lambert-93) over a rough outline of France, coloured by domain (o train, ^ test)."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch

    fig, ax = plt.subplots(figsize=(8.5, 8.5))
    for p in france_paths():
        ax.add_patch(PathPatch(p, facecolor="0.94", edgecolor="0.5", linewidth=1))
    sel = meta.dropna(subset=["patch_centroid_x", "patch_centroid_y"])
    if len(sel) > max_points:
        sel = sel.sample(max_points, random_state=seed)
    cmap = plt.get_cmap("tab20")
    domains = sorted(meta["domain"].unique())
    colour = {d: cmap(i % 20) for i, d in enumerate(domains)}
    for (split, domain), grp in sel.groupby(["split", "domain"]):
        ax.scatter(grp["patch_centroid_x"] / 1000, grp["patch_centroid_y"] / 1000, s=10, color=colour[domain],
                   marker="^" if split == "test" else "o", edgecolors="none", rasterized=True)
    for _, r in domain_positions(meta).iterrows():
        ax.annotate(r["domain"].split("_")[0], (r["x"] / 1000, r["y"] / 1000), fontsize=7, xytext=(3, 3),
                    textcoords="offset points", fontweight="bold" if r["split"] == "test" else "normal")
    ax.set_aspect("equal")
    ax.set_xlim(50, 1300)
    ax.set_ylim(6000, 7180)
    ax.set_xlabel("Lambert-93 x (km)")
    ax.set_ylabel("Lambert-93 y (km)")
    ax.set_title(f"patch centroids of {len(domains)} domains (colour = domain; bold label = test domain)",
                 fontsize=10)
    handles = [Line2D([], [], marker=m, linestyle="", color="0.3", label=s)
               for m, s in (("o", "train"), ("^", "test"))]
    ax.legend(handles=handles, loc="lower left", fontsize=8)
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")
