"""The Gradio app's building blocks: media segments, input validation, speech synthesis, metrics, panels."""
