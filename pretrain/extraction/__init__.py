"""Stage 3a: `pretrain export` (`export.py`) and `pretrain extract` (`extract.py` with its options `args.py`, keep
rules `keep_rules.py`, report `report.py`, size sweep `sweep.py`, distillation `heal.py`).
"""
