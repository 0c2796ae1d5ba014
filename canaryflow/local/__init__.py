"""The embedded local stack: supervisord, the key watch, the demo."""
