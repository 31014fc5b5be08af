"""Stage 2's loop: `pretrain train` (`train.py`), `pretrain evaluate` (`evaluate.py`), and what every training loop
shares (`lifecycle.py`: start, rank agreement, non-finite guard, checkpoint / stop / shutdown; `objective.py`;
`signals.py`; `tracking.py`; `routing_stats.py`; `plots.py`).
"""
