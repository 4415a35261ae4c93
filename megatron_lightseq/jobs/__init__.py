"""The jobs: the main job (train), the attention demo, the launcher, CPU stand-ins for megatron-core,
the CPU mode for real Megatron-LM scripts (megatron_cpu)."""
