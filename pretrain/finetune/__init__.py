"""Stage 3: dense multi-task fine-tuning (NYUD-v2, PASCAL-Context) of a pretrained backbone with a dense decoder.

Imports the core (config sections, engine, checkpoint, loop pieces, models, metrics, data); nothing in the core
imports this package. Its schema is `pretrain/config/finetuning.py`; `init.py` is where backbones come from,
`record.py` what a run keeps of its backbone (so resume and evaluation never reread the source), `losses.py` the
per-task losses, `train.py` the loop, `evaluate.py` the meter table and `pretrain evaluate` for fine-tuning runs.
"""
