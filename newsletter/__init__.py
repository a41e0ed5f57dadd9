"""newsletter: YAML issue files in, responsive HTML email and plain text out."""

__version__ = "0.1.0"
