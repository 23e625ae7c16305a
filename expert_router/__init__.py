"""splitserve expert_router package."""
