"""The G-MLLM: group-aware multimodal LM (tiny LLaVA from config or a local checkpoint), its inputs,
tokenizer, prompt grammar and artifacts."""
