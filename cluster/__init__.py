"""splitserve cluster package."""
