"""Index rows -> samples -> batches: Sentinel-2 series, augmentation (CPU draw, device half),
normalisation, the dataset, the one DataLoader builder, pseudo-labelled patches."""
