"""Settings, client factories, metrics, the embedded local stack and deployment assets."""
