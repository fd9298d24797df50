"""Raw data in: download and extraction, the index of a FLAIR #2 tree and its checks, class histograms,
validation folds by domain, the synthetic dataset generator."""
