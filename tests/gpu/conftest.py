"""tests/gpu: the GPU check (``tools/gpu_check.py`` runs it and prints the table).

Every test here carries the ``gpu`` marker and is skipped where CUDA is absent (the CPU suite):
these rows measure what only a GPU run shows; the CPU suite proves the same code paths on gloo.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU (run tools/gpu_check.py on a GPU machine)")
    for item in items:  # every item of the session passes here: only those marked gpu
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
