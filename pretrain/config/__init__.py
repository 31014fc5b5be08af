"""Configs: the mechanism (`load.py`: defaults ← YAML overlay ← `key=value`), the checks every schema shares
(`checks.py`), and one schema per command (`pretraining.py`, `finetuning.py`, `add_task.py`). Schemas are data: no
import registers anything.
"""
