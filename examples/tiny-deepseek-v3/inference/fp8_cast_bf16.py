# placeholder: FP8 -> BF16 cast using weight_dequant
