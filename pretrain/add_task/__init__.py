"""`pretrain add-task MODEL CONFIG`: train new tasks into a trained pretraining model, the old tasks bit-identical.

`config.py` is its schema (registered as the `add_task:` stage), `train.py` its loop on the training engine; the
model side (split rows, freezing, the merged file layout) is `pretrain.models.grow`.
"""
