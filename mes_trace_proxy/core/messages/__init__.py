"""core.messages."""
