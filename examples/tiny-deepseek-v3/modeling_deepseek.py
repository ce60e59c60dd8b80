# placeholder for DeepseekV3ForCausalLM (remote code)
