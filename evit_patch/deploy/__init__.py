"""Deployment: save/load, the Hub, ``torch.export``/ONNX, safe weight loading and atomic writes."""
