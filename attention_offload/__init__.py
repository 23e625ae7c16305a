"""splitserve attention_offload package."""
