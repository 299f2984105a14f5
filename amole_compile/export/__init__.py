"""ONNX export: one pipeline (`_pipeline.py`) for the scoring / KV-cache graph (`onnx.py`) and the
onnxruntime-genai folder (`genai.py`); `runtime.py` runs the result (`OnnxLM`). Imports no checkpoint or API
verb and never `passes/`."""
