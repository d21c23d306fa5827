"""Model, data and metrics shared by the pipeline's stages (see dvc.yaml)."""
