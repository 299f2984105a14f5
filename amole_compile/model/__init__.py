"""What a transformed model holds: its one state record (`state.py`), the adapter modules (`modules.py`,
`projection.py`) and mixed batches (`mixed.py`, `batch.py`). Imports nothing above `config`, `files`,
`kernels/` and the plan's data types (`passes/targets.py`)."""
