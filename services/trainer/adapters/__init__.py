"""What trains: LoRA and its variants (DoRA, rsLoRA, QLoRA) applied with peft, or every weight
(`lora`); LoRA's input dropout drawn once per input (`lora_dropout`); an adapter as per-layer
factors, for merging (`factors`)."""
