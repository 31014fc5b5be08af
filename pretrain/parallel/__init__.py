"""Stage 2's parallel machinery: DeepSpeed (`engine.py`, the only place with `ds_moe.py` that imports it at module
level), the MoE layer factory (`layers.py`) and expert-parallel token exchange (`expert_parallel.py`).
"""
