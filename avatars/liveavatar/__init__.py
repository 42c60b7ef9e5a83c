"""LiveAvatar (Wan2.2-S2V-14B + the LiveAvatar LoRA) as a streaming backend running the ISPA engine."""
