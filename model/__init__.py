"""molstream model: encoder, ESA backbone, tasks, LightningModules; ``model.load_pretrained(path)`` for inference."""


def __getattr__(name: str):
    """``model.load_pretrained(path)`` without importing torch when only ``model.config`` is needed."""
    if name == "load_pretrained":
        from model.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'model' has no attribute {name!r}")
