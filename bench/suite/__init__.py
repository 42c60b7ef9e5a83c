"""The stages of `bench/gpu_suite.py`: each a function that records its figures through a `Recorder` as it measures."""
