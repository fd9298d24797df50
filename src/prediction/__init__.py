"""The one prediction engine (checkpoints -> an Ensemble, TTA views, ensembling), the pass that writes
a PRED folder, its stores, BatchNorm re-estimation per domain."""
