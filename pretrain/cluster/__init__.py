"""SLURM: `pretrain submit` (`submit.py`; `render.py` fills the top-level `slurm/` templates) and `pretrain status`
(`status.py`).
"""
