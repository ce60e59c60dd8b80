# placeholder for DeepseekV3Config (remote code)
