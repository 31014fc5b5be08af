"""`pretrain train` with NaN losses injected at chosen steps: `nan_run.py SHARDS OUT BAD_STEPS MAX_BAD [k=v ...]`.

BAD_STEPS is a comma list of optimizer steps (0-based) whose every forward returns NaN losses. Prints the summary
(report.emit) {"exit_code", "forwards", "nan_steps"} and then "EXIT <code>"; exits 0 whatever the run's code (the
test asserts on the code it reads).
"""

import math
import sys

from report import emit

import pretrain.training.train as train
from pretrain.config.load import load_config

shards, out, bad, max_bad, *extra = sys.argv[1:]
bad_steps = {int(s) for s in bad.split(",") if s}
cfg = load_config("configs/debug/pretrain.yaml",
                  [f"data.root={shards}", f"output_dir={out}", f"train.max_bad_steps={max_bad}", *extra])
real_forward, calls = train.forward_task, {"n": 0}


def forward_with_nans(engine, batch):
    losses = real_forward(engine, batch)
    step = calls["n"] // cfg.engine.grad_accum  # one forward per micro-batch (one task per micro-batch)
    calls["n"] += 1
    return {k: v * math.nan for k, v in losses.items()} if step in bad_steps else losses


train.forward_task = forward_with_nans
code = train.main(cfg)
emit(f"EXIT {code}", exit_code=code, forwards=calls["n"], nan_steps=sorted(bad_steps))
