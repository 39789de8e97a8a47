"""Exporting a one-step generator for serving: ONNX, torch.export programs, weights and a model card."""
