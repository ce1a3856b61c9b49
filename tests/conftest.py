import os

import torch

# The unit tests use tiny tensors: on a 2-core machine one intra-op thread is faster and steadier
# (this replaces per-module fixtures that did the same).
torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    """``FLOWLIB_TEST_ORDER=reverse`` runs the tests in reverse order: a check that no test depends on
    another having run first (module-scoped fixtures are then built by the last test of their module)."""
    if os.environ.get("FLOWLIB_TEST_ORDER") == "reverse":
        items.reverse()
