"""Jobs that run the plugin or Megatron-LM: entry points and harnesses, never imported by the plugin."""
