"""splitserve protos package."""
