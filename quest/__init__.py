"""quest: the algorithm, in pure PyTorch.

Target profiles decide the arithmetic; quantizers and quantized modules simulate exactly that;
calibration records the FP model's own trajectories; PTQ initialises ranges; QuEST finetunes.
Nothing here imports ONNX: export lives in ``quest_export``.
"""
