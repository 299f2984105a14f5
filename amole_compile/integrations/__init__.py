"""The ecosystem around a transformed model: the table of everything installed on it or patched in another
library (`patches.py`), the aux loss in the model's loss for HF Trainer and TRL (`loss.py`), quantized bases
(`quantized.py`), training wrappers (`distributed.py`) and retired helpers (`trainer.py`)."""
