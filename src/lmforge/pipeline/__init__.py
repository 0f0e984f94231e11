"""The KFP layer: lightweight components (one import, one call into lmforge.steps) and the pipeline."""
