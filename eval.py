"""Evaluate a checkpoint on a benchmark: ``python eval.py --config ... --benchmark NAME``."""

import sys

if __name__ == "__main__":
    sys.exit("eval.py: evaluation is not implemented yet (issue 6); see README.md 'Status'.")
