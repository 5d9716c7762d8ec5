"""inference_workers package."""
