"""Learner room: G-MLLM, pre-training, Group-DPO, gate, publish, and the learner service that follows the pairs topic."""
