"""The models: the registry (models.yaml), the families that build originals, embedding heads, your own
modules, checkpoint preprocessing."""
