import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bigbench==1.0.0 has left PyPI: the `bigbench` and `bigbench_safety` sources are read from hand-written
# miniatures in its layout (tests/data/bigbench/README.md), here and in every process the tests start
_BIGBENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bigbench")
os.environ["LLMKIT_SOURCE_DIRS"] = f"bigbench={_BIGBENCH},bigbench_safety={_BIGBENCH}"

import pytest  # noqa: E402
import torch  # noqa: E402
from skip_gate import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401 - CI: a skip fails


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory):
    """tinyshakespeare, character-level, as train/val shards (the first passages are validation), with
    the tokenizer beside them."""
    from llmkit.data.corpora import documents
    from llmkit.data.shards import write_shards
    from llmkit.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("shakespeare")
    docs = [d.text for d in documents("tinyshakespeare")]
    tokenizer = Tokenizer.train_chars(docs)
    tokenizer.save_pretrained(root / "tokenizer")
    write_shards(docs[2:], tokenizer, root / "train", workers=1, progress=False)
    write_shards(docs[:2], tokenizer, root / "val", workers=1, progress=False)
    return root
