"""`python -m llmkit` is the `llmkit` command (for environments whose scripts are not on PATH)."""

from llmkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
