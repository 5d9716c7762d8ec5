def demo() -> None:
    """Run the demo (TODO)."""
