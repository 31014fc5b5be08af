"""`pretrain train` recording the data it trains on: `data_order.py SHARDS OUT [k=v ...]` (debug config).

Each rank prints the summary (report.emit) {"exit_code", "batches": per micro-step [task, [[key, image digest], ...]]}
in its own output (torchrun prefixes each rank's lines), so a test can rebuild the global batch of every step.
"""

import hashlib
import sys

from report import emit

import pretrain.training.train as train
from pretrain.config.load import load_config

shards, out, *extra = sys.argv[1:]
cfg = load_config("configs/debug/pretrain.yaml", [f"data.root={shards}", f"output_dir={out}", *extra])
real_forward, batches = train.forward_task, []


def recording_forward(engine, batch):
    digests = [hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()[:16] for image in batch["images"]]
    batches.append([batch["task"], [list(pair) for pair in zip(batch["keys"], digests)]])
    return real_forward(engine, batch)


train.forward_task = recording_forward
code = train.main(cfg)
emit(f"EXIT {code}", exit_code=code, batches=batches)
