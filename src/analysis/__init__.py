"""The helpers of notebooks/eda.ipynb (make eda): classes, images, Sentinel-2, metadata and the prose
written from their numbers."""
