"""Shared fixtures: seeded runs, and the offline data folder (skipped when absent)."""
import pytest
import torch

from trainers.paths import data_dir

# The test models are tiny: a second intra-op thread only adds synchronisation
# (generation of stories260K ran ~15x slower with two threads on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data():
    """The folder of real data sets (shared/data), or skip with the reason."""
    root = data_dir()
    if root is None:
        pytest.skip("needs the offline data folder shared/data beside the checkout "
                    "(or NANOPEFT_DATA pointing at one); see shared/data/PROVENANCE.md")
    return root


@pytest.fixture(scope="session")
def stories260k(shared_data):
    folder = shared_data / "stories260K"
    if not (folder / "stories260K.bin").exists():
        pytest.skip(f"needs {folder}/stories260K.bin (llama2.c stories260K checkpoint)")
    return folder
