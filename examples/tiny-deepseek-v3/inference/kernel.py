# placeholder: weight_dequant(x, s, block_size=128)
