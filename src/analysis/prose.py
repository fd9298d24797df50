"""The conclusions printed under each section of the EDA notebook, written from the numbers of the run
(Markdown), so they stay true on the real data and on the synthetic data alike."""
from __future__ import annotations

import numpy as np
import pandas as pd

from src.analysis.classes import band_shift, domain_divergence, percent_table, split_shift
from src.analysis.common import MONTHS
from src.analysis.meta import inside_france, nearest_train_domain
from src.core.flair import BAND_MEAN, BAND_NAMES
from src.data.sentinel import BASELINE


def _pct(v: float) -> str:
    return f"{v:.1f}%" if np.isfinite(v) else "n/a"


def _top_classes(pct: pd.Series, n: int = 3) -> str:
    top = pct.sort_values(ascending=False, kind="stable").head(n)
    return ", ".join(f"{name} ({_pct(v)})" for name, v in top.items())


def conclude_classes(hist: pd.DataFrame) -> str:
    """Markdown summary of the class frequencies (built from the numbers, true on any data)."""
    pct = percent_table(hist, "split")
    info = hist.attrs.get("masks", {})
    counted = "; ".join(f"{s}: {n} of {total} labelled masks" for s, (n, total) in info.items())
    lines = [f"- Masks counted: {counted}."]
    for split in [s for s in ("train", "test") if s in pct.index]:
        lines.append(f"- Most frequent classes in **{split}**: {_top_classes(pct.loc[split])}; "
                     f"'other' (raw 13-19, not scored): {_pct(pct.loc[split, 'other'])}.")
    if {"train", "test"} <= set(pct.index):
        shift = split_shift(hist).head(3)
        parts = [f"{r['name']} {_pct(r['train_pct'])} -> {_pct(r['test_pct'])} ({r['diff_pts']:+.1f} pts, "
                 f"x{r['ratio']:.2f})" for _, r in shift.iterrows()]
        lines.append(f"- Largest train -> test changes of class share: {'; '.join(parts)}.")
    dom = percent_table(hist, "domain")
    spread = (dom.max() - dom.min()).drop("other")
    k = spread.idxmax()
    lines.append(f"- Between domains, the share of **{k}** varies most: {_pct(dom[k].min())} "
                 f"({dom[k].idxmin()}) to {_pct(dom[k].max())} ({dom[k].idxmax()}).")
    div = domain_divergence(hist)
    (split, domain), r = div.index[0], div.iloc[0]
    lines.append(f"- Most atypical domain: {domain} ({split}), Jensen-Shannon divergence "
                 f"{r['js_bits']:.3f} bits from all training pixels (median over domains "
                 f"{div['js_bits'].median():.3f}); its top class is {r['top_class']}.")
    if spread.max() >= 5:
        lines.append(f"- Class shares differ between domains by up to {spread.max():.0f} percentage points, "
                     "so a validation fold must hold out whole domains (what `make folds` does) to estimate "
                     "the score on unseen test domains.")
    return "\n".join(lines)


def _span(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return str(lo) if lo == hi else f"{lo} to {hi}"


def conclude_folds(stats: pd.DataFrame, hist: pd.DataFrame) -> str:
    """Markdown summary of the fold balance against single domains."""
    div = domain_divergence(hist[hist["split"] == "train"])
    sizes = stats["patches"].astype(int)
    per_fold = stats["domains"].str.split().str.len()
    fold_js, dom_js = float(stats["js"].mean()), float(div["js_bits"].mean())
    if per_fold.max() <= 1:
        verdict = "each fold is a single domain here, so folds cannot be more balanced than domains."
    elif fold_js < dom_js:
        verdict = "grouping domains into folds brings each fold's class mix closer to the whole training set."
    else:
        verdict = "grouping domains does not reduce the divergence here."
    return "\n".join([
        f"- {len(stats)} folds of {_span(per_fold)} domain(s) and {_span(sizes)} patches each.",
        f"- Jensen-Shannon divergence of each fold from all training pixels: "
        f"{', '.join(f'{v:.4f}' for v in stats['js'])} bits (mean {fold_js:.4f}), against a mean of "
        f"{dom_js:.4f} bits for a single training domain: {verdict}",
    ])


def conclude_images(stats: pd.DataFrame) -> str:
    """Markdown summary of the aerial band statistics of the sample."""
    z = band_shift(stats)
    split, domain, band = z.abs().stack().idxmax()
    value = z.loc[(split, domain), band]
    means = stats[[f"mean_{b}" for b in BAND_NAMES]].mean().to_numpy()
    pairs = ", ".join(f"{b} {m:.1f} vs {ref:.1f}" for b, m, ref in zip(BAND_NAMES, means, BAND_MEAN))
    far = int((z.abs() > 0.5).to_numpy().sum())
    return "\n".join([
        f"- {len(stats)} sampled patches from {stats['domain'].nunique()} domains.",
        f"- Band means of the sample vs the kit's normalisation means (src.core.flair.BAND_MEAN): {pairs}.",
        f"- Largest domain shift: {domain} ({split}) in band {band}, {value:+.2f} std from BAND_MEAN; "
        f"{far} of {z.size} (domain, band) means are more than 0.5 std away"
        + (": radiometry changes from one domain to the next, which colour augmentation has to cover."
           if far else "."),
    ])


def conclude_s2(survey: dict[str, pd.DataFrame], row: pd.Series,
                cover_max: float = BASELINE.cover_max) -> str:
    """Markdown summary of cloud/snow cover and series lengths."""
    cov, lengths = survey["cover"], survey["lengths"]
    mine = lengths[lengths["id"] == row["id"]].iloc[0]
    none_kept = int((cov.groupby("id")["cover"].min() >= cover_max).sum())
    return "\n".join([
        f"- {len(lengths)} sampled patches, {len(cov)} (patch, date) pairs: "
        f"{100 * (cov['cover'] >= cover_max).mean():.1f}% have a snow + cloud cover >= {cover_max:g} and are "
        f"dropped by the filter (snow alone >= {cover_max:g}: "
        f"{100 * (cov['snow'] >= cover_max).mean():.1f}%).",
        f"- {none_kept} patch(es) have no date under the threshold (the kit then keeps the least covered "
        "dates instead of crashing like the baseline).",
        f"- Dates per series, median (min-max): raw {lengths['raw'].median():g} ({lengths['raw'].min()}-"
        f"{lengths['raw'].max()}), after the filter {lengths['filtered'].median():g} "
        f"({lengths['filtered'].min()}-{lengths['filtered'].max()}), after monthly compositing "
        f"{lengths['monthly'].median():g} ({lengths['monthly'].min()}-{lengths['monthly'].max()}).",
        f"- Patch {row['id']} shown above: {mine['raw']} dates -> {mine['filtered']} kept -> "
        f"{mine['monthly']} monthly composites.",
    ])


def _named(values: pd.Series) -> str:
    return ", ".join(f"{n} ({v:.2f})" for n, v in values.items())


def conclude_ndvi(table: pd.DataFrame, min_pixels: int = 5) -> str:
    """Markdown summary of the NDVI curves per class."""
    t = table[table["pixels"] >= min_pixels]
    if t.empty:
        return "- No S2 pixel under the sampled patches is pure enough for a per-class NDVI curve."
    per_class = t.groupby("name")["mean"]
    year_mean = per_class.mean().sort_values(ascending=False)
    amp = (per_class.max() - per_class.min())
    amp = amp[t.groupby("name")["month"].nunique() >= 3].sort_values(ascending=False)
    lines = [f"- {t['pixels'].sum()} pixel-months from {t['class'].nunique()} classes.",
             f"- Highest mean NDVI over the months: {_named(year_mean.head(3))}; "
             f"lowest: {_named(year_mean.tail(2))}."]
    if len(amp):
        name = amp.index[0]
        c = t[t["name"] == name].set_index("month")["mean"]
        lines.append(f"- Largest seasonal amplitude (classes seen in >= 3 months): {name}, NDVI "
                     f"{c.min():.2f} ({MONTHS[c.idxmin() - 1]}) to {c.max():.2f} ({MONTHS[c.idxmax() - 1]}).")
    a = t[t["class"] == 10].set_index("month")["mean"]  # agricultural land
    h = t[t["class"] == 9].set_index("month")["mean"]  # herbaceous vegetation
    both = a.index.intersection(h.index)
    if len(both):
        diff = (a[both] - h[both]).abs()
        m = int(diff.idxmax())
        verdict = ("the S2 time series tells these two low-vegetation classes apart in some months."
                   if diff.max() >= 0.1 else "their NDVI curves are close.")
        lines.append(f"- Agricultural land vs herbaceous vegetation: monthly NDVI differs by up to "
                     f"{diff.max():.2f} ({MONTHS[m - 1]}: {a[m]:.2f} vs {h[m]:.2f}), {diff.mean():.2f} on "
                     f"average over {len(both)} shared months: {verdict}")
    return "\n".join(lines)


def conclude_metadata(meta: pd.DataFrame) -> str:
    """Markdown summary of acquisition dates, times, cameras and altitude."""
    lines = []
    dates = meta["date"].dropna()
    if len(dates):
        months = dates.dt.month.value_counts(normalize=True)
        top = ", ".join(f"{MONTHS[m - 1]} {100 * v:.0f}%" for m, v in months.head(3).items())
        lines.append(f"- Aerial images taken from {dates.min():%Y-%m-%d} to {dates.max():%Y-%m-%d} "
                     f"(years {', '.join(str(y) for y in sorted(dates.dt.year.unique()))}); "
                     f"busiest months: {top}.")
    else:
        lines.append("- No acquisition dates in the index (metadata JSON missing).")
    hours = meta["hour"].dropna()
    if len(hours):
        med = int(round(hours.median() * 60))
        lines.append(f"- Acquisition time: median {med // 60}h{med % 60:02d}, 5-95% range "
                     f"{hours.quantile(0.05):.1f} h to {hours.quantile(0.95):.1f} h.")
    cams = meta["camera"][meta["camera"] != ""].value_counts(normalize=True)
    if len(cams):
        lines.append(f"- {len(cams)} camera(s); most common {cams.index[0]} "
                     f"({100 * cams.iloc[0]:.0f}% of patches).")
    z = meta.dropna(subset=["patch_centroid_z"])
    parts = [f"{s} median {g.median():.0f} m (5-95%: {g.quantile(0.05):.0f}-{g.quantile(0.95):.0f} m)"
             for s in ("train", "test") if len(g := z.loc[z["split"] == s, "patch_centroid_z"])]
    if parts:
        lines.append(f"- Altitude of the patch centroids: {'; '.join(parts)}.")
    return "\n".join(lines)


def conclude_map(meta: pd.DataFrame) -> str:
    """Markdown summary of where the domains are."""
    sel = meta.dropna(subset=["patch_centroid_x", "patch_centroid_y"])
    if sel.empty:
        return "- No patch centroid coordinates in the index (metadata JSON missing)."
    inside = inside_france(sel["patch_centroid_x"], sel["patch_centroid_y"])
    x, y = sel["patch_centroid_x"] / 1000, sel["patch_centroid_y"] / 1000
    outside = "" if inside.all() else (" (the others lie near the coast, where the outline is coarse, or are "
                                       "misplaced)")
    lines = [f"- {len(sel)} centroids of {sel['domain'].nunique()} domains, x {x.min():.0f}-{x.max():.0f} "
             f"km, y {y.min():.0f}-{y.max():.0f} km; {100 * inside.mean():.1f}% fall inside the rough "
             f"outline drawn here{outside}."]
    near = nearest_train_domain(meta)
    if len(near) == 1:
        r = near.iloc[0]
        lines.append(f"- The nearest training domain to the test domain {r['test_domain']} is "
                     f"{r['nearest_train']}, {r['km']:.0f} km away.")
    elif len(near):
        far = near.sort_values("km").iloc[-1]
        lines.append(f"- Each test domain's nearest training domain lies {near['km'].min():.0f} to "
                     f"{near['km'].max():.0f} km away (median {near['km'].median():.0f} km; farthest: "
                     f"{far['test_domain']}, {far['km']:.0f} km from {far['nearest_train']}).")
    return "\n".join(lines)
