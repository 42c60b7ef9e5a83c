"""Getting LiveAvatar's weights onto the device: downloads, the DiT loader with the LoRA merge, FP8."""
