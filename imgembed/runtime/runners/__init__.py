"""One runner per backend (ONNX Runtime, OpenVINO, PyTorch, TensorRT); the backend table in
:mod:`imgembed.runtime.backends` opens them."""
