"""The refusal model organism: a tiny MoE chat model, trained by edge-mote, whose refusal lives in a few experts."""
