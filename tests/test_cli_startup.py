"""`llmkit --help` answers without importing torch or any verb's module (they load when a verb runs);
benchmarks/cli_startup.py times it."""

import subprocess
import sys

PROBE = """
import sys
from llmkit.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "llmkit.commands", "llmkit.train")))
print("HEAVY", heavy)
"""


def test_help_imports_no_torch_and_no_verb():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"


def test_the_package_root_loads_its_names_on_first_use():
    probe = ("import sys, llmkit; before = 'torch' in sys.modules; import llmkit.generate.chat; "
             "print(before, llmkit.generate.__module__, llmkit.Transformer.__name__, sorted(llmkit.__all__)[:2])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    # the subpackage llmkit.generate, once imported, does not take the function's name
    assert out.strip() == "False llmkit.generate.api Transformer ['ConfigError', 'DataError']"
