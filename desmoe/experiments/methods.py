"""The experiments' method vocabulary: each experiment METHOD name and the trainer's ``method.name`` it runs."""
from __future__ import annotations

# experiment METHOD name -> trainer method.name
TRAINER_METHOD = {"fft_mixed": "fft", "fft_attention_frozen": "fft_attention_frozen", "frozen_router": "frozen_router",
                  "experts_only": "experts_only", "esft_gate": "esft_gate", "esft_token": "esft_token",
                  "des_moe": "des_moe", "des_moe_no_alr": "des_moe_no_alr", "des_moe_no_dges": "des_moe_no_dges",
                  "fft_single": "fft", "esft_gate_single": "esft_gate", "esft_token_single": "esft_token"}
# one run per domain (data.domains = [d]), each with its own ESFT expert selection: the paper's ESFT protocol
SINGLE_METHODS = ("fft_single", "esft_gate_single", "esft_token_single")
