"""`pretrain add-task MODEL CONFIG`: train new tasks into a trained pretraining model, the old tasks bit-identical.

Its schema is `pretrain/config/add_task.py` (the `add_task:` stage), `train.py` its loop on the training engine,
`dense.py` the tasks whose shards are a dense dataset's (NYUD-v2 / PASCAL-Context semseg), `evaluate.py`
`pretrain evaluate` of its run; the model side (split rows, frozen and added experts, the merged file layout) is
`pretrain.models.grow` and `pretrain.models.grow_layers`.
"""
