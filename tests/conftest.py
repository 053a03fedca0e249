import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from skip_gate import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401 - CI: a skip fails


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
