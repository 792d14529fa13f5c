"""squeezekit's evaluators: the lm-eval adapter, offline quality evaluation and the speed benchmark."""
