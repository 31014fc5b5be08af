"""SLURM: `pretrain submit` (`submit.py`, rendering the top-level `slurm/` templates) and `pretrain status`
(`status.py`).
"""
