"""DUO (Park et al., NeurIPS 2024): SDEdit paired data and preference-optimisation unlearning."""
