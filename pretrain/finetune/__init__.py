"""Stage 3: dense multi-task fine-tuning (NYUD-v2, PASCAL-Context) of a pretrained backbone with a dense decoder.

Imports the core (config sections, engine, checkpoint, loop pieces, models, metrics, data); nothing in the core
imports this package. `config.py` is the schema, `init.py` where backbones come from, `losses.py` the per-task losses,
`train.py` the loop, `evaluate.py` the meter table and `pretrain evaluate` for fine-tuning runs.
"""
