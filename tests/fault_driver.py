"""`llmkit` with one checkpoint write stopped halfway, so a test can SIGKILL it inside the save.

    python tests/fault_driver.py FILE MARKER VERB [FLAGS ...]

runs `llmkit VERB FLAGS` in this process. When an atomic write (llmkit.files.atomic_path) targets a
path ending in FILE (e.g. `step-0000004.tmp/trainer_state/optimizer.pt`), its temporary file is cut to
half its bytes, MARKER is written with that temporary file's path, and the process waits to be killed:
the kill lands inside the save every time, with no sleeping and hoping. Used by
tests/test_train_faults.py; not collected by pytest.
"""

import contextlib
import sys
import time
from pathlib import Path

import llmkit.cli
import llmkit.files


def main(target: str, marker: Path, argv: list[str]) -> int:
    real = llmkit.files.atomic_path

    @contextlib.contextmanager
    def pausing(path):
        with real(path) as tmp:
            yield tmp
            if Path(path).as_posix().endswith(target):
                tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                marker.write_text(str(tmp))
                time.sleep(600)  # the test's SIGKILL arrives here
                raise SystemExit("fault_driver: no SIGKILL came within 600 s")

    for module in list(sys.modules.values()):  # every `from llmkit.files import atomic_path`
        if module.__name__.startswith("llmkit") and getattr(module, "atomic_path", None) is real:
            module.atomic_path = pausing
    return llmkit.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
