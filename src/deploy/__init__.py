"""Beyond the challenge: whole-orthophoto inference (windows, GeoTIFFs) and exports (slim checkpoint,
ONNX)."""
