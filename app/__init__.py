"""Longlens Gradio app: UI, figures and glue to the runtime."""
