"""Train (and measure) the built-in GroupViT model on the synthetic world: the command that reproduces it.

    python tools/train_builtin.py --out runs/builtin --time-budget 1750    # the shipped recipe ("small"), CPU
    python tools/train_builtin.py --out runs/x --variant no_group --steps 500   # a recipe of the log

Same as ``groupvit train``; see groupvit_pt.training.train_synthetic. Writes OUT/model, OUT/checkpoint
(``--resume`` continues it), OUT/result.json (mIoU with grouping, the patch-level ablation, random weights),
OUT/history.json and OUT/log.txt. ``--export DIR`` then writes the model as the package's built-in (float16).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from groupvit_core.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
