"""The jobs: the main job (train), the attention demo, the launcher, CPU stand-ins for megatron-core."""
