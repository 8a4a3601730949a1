"""molstream's training: config tree, ``python -m training.run``, callbacks, embedding export."""

import pipeline as _pipeline

if not hasattr(_pipeline, "check_installation"):
    raise ImportError(f"molstream: 'pipeline' resolves to {getattr(_pipeline, '__file__', None) or _pipeline.__path__}, "
                      f"not to the molstream package beside {__file__}: a file or package named 'pipeline' earlier on "
                      "sys.path (or another installed distribution) shadows molstream's. Rename or move it, or "
                      "uninstall the other distribution.")
_pipeline.check_installation()
