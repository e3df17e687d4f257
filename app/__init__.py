"""VisionZip Live: the Gradio demo. `app.py` parses options and calls `app.ui.build_demo`."""
