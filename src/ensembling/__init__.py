"""Out-of-fold stores, the ensemble search on them and the recipe that predict applies."""
