"""VisionZip Live, the Gradio app.  `app.hosting` comes first: on ZeroGPU, `spaces` must be imported
before torch."""

from app import hosting  # noqa: F401  (import order: see app/hosting.py)
