"""molstream's model: encoder, ESA backbone, tasks, LightningModules; ``model.load_pretrained(path)`` for inference."""

import pipeline as _pipeline

if not hasattr(_pipeline, "check_installation"):
    raise ImportError(f"molstream: 'pipeline' resolves to {getattr(_pipeline, '__file__', None) or _pipeline.__path__}, "
                      f"not to the molstream package beside {__file__}: a file or package named 'pipeline' earlier on "
                      "sys.path (or another installed distribution) shadows molstream's. Rename or move it, or "
                      "uninstall the other distribution.")
_pipeline.check_installation()


def __getattr__(name: str):
    """``model.load_pretrained(path)`` without importing torch when only ``model.config`` is needed."""
    if name == "load_pretrained":
        from model.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'model' has no attribute {name!r}")
