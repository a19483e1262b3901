"""specdraft's library: data prep, target backends, the EAGLE-3 draft, trainer, export, evaluation.

No Dagster imports here: everything is plain Python, testable without the orchestrator.
"""

import os

# Torch's OpenMP workers spin while waiting for work. With small CPU ops (decoding a small
# model, short batches) and more busy threads than cores, the spinning starves the real work:
# generation with the demo target measured 13 tok/s spinning against 1029 tok/s passive on a
# loaded 2-core machine. Must be set before torch loads OpenMP; the user's choice wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
