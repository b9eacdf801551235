"""What a checkpoint is made of: VLM anatomy (vision tower, projector, language model) and vocabulary alignment."""
