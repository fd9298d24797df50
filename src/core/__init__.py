"""The bottom of the kit: errors, the settings schema and its loading, the FLAIR #2 facts (classes, bands,
geometry), atomic files and TIFFs, the index and folds tables, progress, runtime policies, checkpoints."""
