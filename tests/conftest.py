import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_models():
    """Each test module's engines, compiled graphs and their caches are let go before the next
    module: the in-process tests compile many models, and CI has 24 GiB."""
    yield
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
