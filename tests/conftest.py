import os

import torch

# The unit tests use tiny tensors: on a 2-core machine one intra-op thread is faster and steadier
# (this replaces per-module fixtures that did the same).
torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    """``FLOWLIB_TEST_ORDER=reverse`` runs the tests in reverse order: a check that no test depends on
    another having run first (module-scoped fixtures are then built by the last test of their module). The
    cells of a notebook checked by nbval stay in their order (they are one program); the notebooks
    themselves are reversed like every other file."""
    if os.environ.get("FLOWLIB_TEST_ORDER") != "reverse":
        return
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(str(item.path), []).append(item)
    ordered = []
    for path, group in reversed(groups.items()):
        ordered += group if path.endswith(".ipynb") else group[::-1]
    items[:] = ordered
