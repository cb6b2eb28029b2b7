"""An example third-party cambrian plugin."""
