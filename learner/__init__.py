"""Learner room: G-MLLM, renderers, pre-training, Group-DPO, gate, publish."""
