"""Train PPLLaVA (SFT or DPO): ``python train.py --config configs/demo.py --workdir DIR``."""

import sys

if __name__ == "__main__":
    sys.exit("train.py: training is not implemented yet (issue 5); see README.md 'Status'.")
