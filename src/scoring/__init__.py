"""The official metric, per class and per domain; the submission format, its validator and zip; scoring
a PRED folder or a zip."""
